//! Peer discovery for `total_server_connections`: how many pgmux instances share the
//! budget.
//!
//! In Kubernetes a headless Service resolves to one address per pod (with
//! `publishNotReadyAddresses`, as deploy/kubernetes sets it, starting pods too, so a pod
//! is counted before it takes traffic), so the number of distinct addresses behind
//! `peer_dns_name` is the number of pgmux instances. The count is taken every
//! `peer_check_interval` and handed to [`crate::budget::Budgets::set_peers`], which
//! applies `total / peers` like a live limit change. A failed lookup keeps the last
//! count (a DNS hiccup must not hand each pod the whole budget), and is logged once
//! per distinct error.
//!
//! The system resolver (`getaddrinfo`, with resolv.conf's search domains) is used, unless
//! `peer_dns_server` names a DNS server to ask directly: then A and AAAA queries go to it
//! over UDP, and over TCP when the answer was truncated.

use std::collections::BTreeSet;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::Shared;

const DNS_TIMEOUT: Duration = Duration::from_secs(2);
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;

/// Counts the peers every `peer_check_interval` until shutdown.
pub async fn run(shared: Arc<Shared>) {
    let mut last_error = String::new();
    loop {
        let cfg = shared.config.load_full();
        match &cfg.peer_dns_name {
            Some(name) => match count(name, cfg.peer_dns_server).await {
                Ok(0) => {
                    // Not even this pod is listed yet (not ready): keep the last count.
                    tracing::debug!(%name, "peer_dns_name has no address yet");
                }
                Ok(n) => {
                    last_error.clear();
                    shared.budgets.set_peers(n);
                }
                Err(e) => {
                    let text = e.to_string();
                    if text != last_error {
                        tracing::warn!(%name, error = %text, peers = shared.budgets.peers(), "peer lookup failed; keeping the last count");
                        last_error = text;
                    }
                }
            },
            None => shared.budgets.set_peers(1),
        }
        tokio::select! {
            _ = shared.shutdown.cancelled() => return,
            _ = tokio::time::sleep(cfg.peer_check_interval) => {}
        }
    }
}

/// Distinct addresses of `name`.
pub async fn count(name: &str, server: Option<SocketAddr>) -> io::Result<usize> {
    let ips: BTreeSet<IpAddr> = match server {
        None => tokio::time::timeout(DNS_TIMEOUT, tokio::net::lookup_host((name, 0)))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS lookup timed out"))??
            .map(|a| a.ip())
            .collect(),
        Some(server) => {
            let mut ips = query(server, name, TYPE_A).await?;
            ips.extend(query(server, name, TYPE_AAAA).await?);
            ips
        }
    };
    Ok(ips.len())
}

/// One question to `server`: UDP first, TCP if the answer was truncated.
async fn query(server: SocketAddr, name: &str, qtype: u16) -> io::Result<BTreeSet<IpAddr>> {
    let id: u16 = rand::thread_rng().gen();
    let q = encode_query(id, name, qtype)?;
    let bind: SocketAddr = if server.is_ipv4() {
        ([0, 0, 0, 0], 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = tokio::net::UdpSocket::bind(bind).await?;
    sock.connect(server).await?;
    sock.send(&q).await?;
    let mut buf = vec![0u8; 4096];
    let answer = loop {
        let n = tokio::time::timeout(DNS_TIMEOUT, sock.recv(&mut buf))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS query timed out"))??;
        match parse_answer(&buf[..n], id, qtype) {
            Ok(a) => break a,
            // Someone else's datagram (wrong id): keep waiting for ours.
            Err(AnswerError::Foreign) => continue,
            Err(AnswerError::Bad(m)) => return Err(io::Error::new(io::ErrorKind::InvalidData, m)),
        }
    };
    if !answer.truncated {
        return Ok(answer.ips);
    }
    // Truncated: the full answer over TCP (two-byte length prefix).
    let mut tcp = tokio::time::timeout(DNS_TIMEOUT, tokio::net::TcpStream::connect(server))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS over TCP timed out"))??;
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    tcp.write_all(&framed).await?;
    let mut len = [0u8; 2];
    tokio::time::timeout(DNS_TIMEOUT, tcp.read_exact(&mut len))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS over TCP timed out"))??;
    let mut body = vec![0u8; u16::from_be_bytes(len) as usize];
    tokio::time::timeout(DNS_TIMEOUT, tcp.read_exact(&mut body))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "DNS over TCP timed out"))??;
    match parse_answer(&body, id, qtype) {
        Ok(a) => Ok(a.ips),
        Err(AnswerError::Foreign) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "DNS answer for another query",
        )),
        Err(AnswerError::Bad(m)) => Err(io::Error::new(io::ErrorKind::InvalidData, m)),
    }
}

fn encode_query(id: u16, name: &str, qtype: u16) -> io::Result<Vec<u8>> {
    let mut q = Vec::with_capacity(name.len() + 18);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]); // RD; one question
    for label in name.trim_end_matches('.').split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "invalid DNS name",
            ));
        }
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.push(0);
    q.extend_from_slice(&qtype.to_be_bytes());
    q.extend_from_slice(&1u16.to_be_bytes()); // IN
    Ok(q)
}

struct Answer {
    ips: BTreeSet<IpAddr>,
    truncated: bool,
}

enum AnswerError {
    Foreign,
    Bad(&'static str),
}

/// Skips a (possibly compressed) name; returns the offset after it.
fn skip_name(m: &[u8], mut i: usize) -> Result<usize, AnswerError> {
    loop {
        let len = *m.get(i).ok_or(AnswerError::Bad("truncated DNS name"))?;
        match len {
            0 => return Ok(i + 1),
            l if l & 0xc0 == 0xc0 => return Ok(i + 2), // pointer ends the name
            l if l & 0xc0 == 0 => i += 1 + l as usize,
            _ => return Err(AnswerError::Bad("bad DNS label")),
        }
    }
}

fn u16_at(m: &[u8], i: usize) -> Result<u16, AnswerError> {
    m.get(i..i + 2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]))
        .ok_or(AnswerError::Bad("truncated DNS message"))
}

fn parse_answer(m: &[u8], id: u16, qtype: u16) -> Result<Answer, AnswerError> {
    if m.len() < 12 || u16_at(m, 0)? != id || m[2] & 0x80 == 0 {
        return Err(AnswerError::Foreign);
    }
    let truncated = m[2] & 0x02 != 0;
    let rcode = m[3] & 0x0f;
    let mut ips = BTreeSet::new();
    if rcode == 3 {
        // NXDOMAIN: no peer listed.
        return Ok(Answer { ips, truncated });
    }
    if rcode != 0 {
        return Err(AnswerError::Bad("DNS server answered with an error"));
    }
    let (qd, an) = (u16_at(m, 4)?, u16_at(m, 6)?);
    let mut i = 12;
    for _ in 0..qd {
        i = skip_name(m, i)? + 4;
    }
    for _ in 0..an {
        i = skip_name(m, i)?;
        let rtype = u16_at(m, i)?;
        let rdlen = u16_at(m, i + 8)? as usize;
        let rdata = m
            .get(i + 10..i + 10 + rdlen)
            .ok_or(AnswerError::Bad("truncated DNS record"))?;
        i += 10 + rdlen;
        match (rtype, rdata.len()) {
            (TYPE_A, 4) if qtype == TYPE_A => {
                ips.insert(IpAddr::from([rdata[0], rdata[1], rdata[2], rdata[3]]));
            }
            (TYPE_AAAA, 16) if qtype == TYPE_AAAA => {
                let b: [u8; 16] = rdata.try_into().expect("16 bytes");
                ips.insert(IpAddr::from(b));
            }
            _ => {} // CNAME and others
        }
    }
    Ok(Answer { ips, truncated })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as a DNS server builds it: the question, then a CNAME (with a
    /// compression pointer) and A records, one of them twice.
    #[test]
    fn answers_are_counted_by_distinct_address() {
        let q = encode_query(7, "pgmux-peers.ns.svc", TYPE_A).unwrap();
        let mut m = q.clone();
        m[2] = 0x81; // QR, RD
        m[3] = 0x80; // RA
        m[7] = 4; // ANCOUNT
                  // CNAME pointing at the question name.
        m.extend_from_slice(&[0xc0, 12, 0, 5, 0, 1, 0, 0, 0, 30, 0, 2, 0xc0, 12]);
        for ip in [[10, 0, 0, 1], [10, 0, 0, 2], [10, 0, 0, 1]] {
            m.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 30, 0, 4]);
            m.extend_from_slice(&ip);
        }
        let a = parse_answer(&m, 7, TYPE_A).ok().unwrap();
        assert_eq!(a.ips.len(), 2);
        assert!(!a.truncated);
        assert!(matches!(
            parse_answer(&m, 8, TYPE_A),
            Err(AnswerError::Foreign)
        ));
        // Cut anywhere: an error, never a panic.
        for n in 0..m.len() {
            let _ = parse_answer(&m[..n], 7, TYPE_A);
        }
        // NXDOMAIN: nobody.
        let mut nx = q;
        nx[2] = 0x81;
        nx[3] = 0x83;
        assert_eq!(parse_answer(&nx, 7, TYPE_A).ok().unwrap().ips.len(), 0);
        assert!(encode_query(1, "a..b", TYPE_A).is_err());
    }
}
