//! A tiny authoritative DNS server on 127.0.0.1 (UDP), answering from a table the test changes
//! while Gatehouse runs.
//!
//! It speaks just enough of RFC 1035 for a stub resolver: one question per query, A answers
//! from the table (name compression pointer to the question), an empty NOERROR answer for any
//! other type of a known name, NXDOMAIN for an unknown one. Malformed datagrams are dropped,
//! never answered and never a panic. `Mode` makes it fail on purpose: SERVFAIL to everything, or
//! silence (a server that is down, as the resolver sees it: it times out).

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::task::JoinHandle;

const TYPE_A: u16 = 1;
const CLASS_IN: u16 = 1;
const RCODE_NOERROR: u8 = 0;
const RCODE_SERVFAIL: u8 = 2;
const RCODE_NXDOMAIN: u8 = 3;

/// How the server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// From the table.
    Answer,
    /// SERVFAIL to every query.
    ServFail,
    /// No answer at all: the query is counted and dropped.
    Silent,
}

/// Name (lower-case, no trailing dot) -> (A records, TTL in seconds).
type Table = HashMap<String, (Vec<Ipv4Addr>, u32)>;

#[derive(Default)]
struct State {
    table: Mutex<Table>,
    mode: Mutex<Option<Mode>>,
    queries: AtomicUsize,
    /// Well-formed queries per name, A and AAAA alike.
    per_name: Mutex<HashMap<String, usize>>,
}

/// The running server. Aborted on drop.
pub struct DnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    task: JoinHandle<()>,
}

impl DnsServer {
    pub async fn start() -> DnsServer {
        let socket = UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("binding the test DNS server");
        let addr = socket.local_addr().expect("test DNS server address");
        let state = Arc::new(State::default());
        let task = tokio::spawn(serve(socket, Arc::clone(&state)));
        DnsServer { addr, state, task }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Answers A queries for `name` with `ips` (none: an empty NOERROR answer), valid `ttl`
    /// seconds.
    pub fn set(&self, name: &str, ips: &[Ipv4Addr], ttl: u32) {
        lock(&self.state.table).insert(normalize(name), (ips.to_vec(), ttl));
    }

    /// Forgets `name`: it gets NXDOMAIN from now on.
    pub fn remove(&self, name: &str) {
        lock(&self.state.table).remove(&normalize(name));
    }

    pub fn set_mode(&self, mode: Mode) {
        *lock(&self.state.mode) = Some(mode);
    }

    /// Well-formed queries received so far, answered or not.
    pub fn queries(&self) -> usize {
        self.state.queries.load(Ordering::SeqCst)
    }

    /// Well-formed queries for `name` so far.
    pub fn queries_for(&self, name: &str) -> usize {
        lock(&self.state.per_name)
            .get(&normalize(name))
            .copied()
            .unwrap_or(0)
    }

    /// A `[resolver]` table that sends every lookup here.
    pub fn resolver_toml(&self, timeout: &str, min_ttl: &str, max_ttl: &str) -> String {
        format!(
            "[resolver]\nnameservers = [\"{}\"]\ntimeout = \"{timeout}\"\nmin_ttl = \"{min_ttl}\"\nmax_ttl = \"{max_ttl}\"\n\n",
            self.addr
        )
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

async fn serve(socket: UdpSocket, state: Arc<State>) {
    let mut buf = vec![0u8; 4096];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(got) => got,
            Err(_) => {
                // An ICMP error from an earlier reply surfaces here on some systems; keep going,
                // without spinning should it persist.
                tokio::time::sleep(Duration::from_millis(5)).await;
                continue;
            }
        };
        let Some(query) = buf.get(..len).and_then(parse_query) else {
            continue;
        };
        state.queries.fetch_add(1, Ordering::SeqCst);
        *lock(&state.per_name).entry(query.name.clone()).or_insert(0) += 1;
        let mode = lock(&state.mode).unwrap_or(Mode::Answer);
        let reply = match mode {
            Mode::Silent => continue,
            Mode::ServFail => response(&query, RCODE_SERVFAIL, &[], 0),
            Mode::Answer => {
                let entry = lock(&state.table).get(&query.name).cloned();
                match entry {
                    None => response(&query, RCODE_NXDOMAIN, &[], 0),
                    Some((ips, ttl)) if query.qtype == TYPE_A && query.qclass == CLASS_IN => {
                        response(&query, RCODE_NOERROR, &ips, ttl)
                    }
                    // AAAA and anything else for a known name: it exists, with no such records.
                    Some(_) => response(&query, RCODE_NOERROR, &[], 0),
                }
            }
        };
        let _ = socket.send_to(&reply, peer).await;
    }
}

/// The parts of a query that the answer needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedQuery {
    pub id: u16,
    /// The header's flags word, for the opcode and RD bits to echo.
    pub flags: u16,
    /// Lower-case, dot-separated, no trailing dot.
    pub name: String,
    pub qtype: u16,
    pub qclass: u16,
    /// The question section exactly as received, echoed back.
    pub question: Vec<u8>,
}

/// Parses a standard query with exactly one question; `None` for anything else.
pub fn parse_query(packet: &[u8]) -> Option<ParsedQuery> {
    let header = packet.get(..12)?;
    let word = |i: usize| u16::from_be_bytes([header[i], header[i + 1]]);
    let (id, flags, qdcount) = (word(0), word(2), word(4));
    let is_response = flags & 0x8000 != 0;
    let opcode = (flags >> 11) & 0xf;
    if is_response || opcode != 0 || qdcount != 1 {
        return None;
    }
    let mut labels: Vec<String> = Vec::new();
    let mut at = 12;
    loop {
        let len = usize::from(*packet.get(at)?);
        at += 1;
        if len == 0 {
            break;
        }
        // Compression pointers (and the reserved 0x40/0x80 forms) have no place in a question.
        if len > 63 {
            return None;
        }
        let label = packet.get(at..at + len)?;
        at += len;
        if !label.iter().all(|b| b.is_ascii_graphic()) {
            return None;
        }
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        if at - 12 > 255 {
            return None;
        }
    }
    let fixed = packet.get(at..at + 4)?;
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let qclass = u16::from_be_bytes([fixed[2], fixed[3]]);
    Some(ParsedQuery {
        id,
        flags,
        name: labels.join("."),
        qtype,
        qclass,
        question: packet.get(12..at + 4)?.to_vec(),
    })
}

/// A response to `query`: the question echoed, then one A record per address, each naming the
/// question's name by a pointer to offset 12 (0xC00C).
pub fn response(query: &ParsedQuery, rcode: u8, ips: &[Ipv4Addr], ttl: u32) -> Vec<u8> {
    // QR, the query's opcode and RD, AA (this server is the authority), RA.
    let flags: u16 = 0x8000 | (query.flags & 0x7900) | 0x0400 | 0x0080 | u16::from(rcode & 0xf);
    let answers = u16::try_from(ips.len()).unwrap_or(u16::MAX);
    let mut out = Vec::with_capacity(12 + query.question.len() + 16 * ips.len());
    for word in [query.id, flags, 1, answers, 0, 0] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    out.extend_from_slice(&query.question);
    for ip in ips.iter().take(usize::from(answers)) {
        out.extend_from_slice(&[0xC0, 0x0C]);
        out.extend_from_slice(&TYPE_A.to_be_bytes());
        out.extend_from_slice(&CLASS_IN.to_be_bytes());
        out.extend_from_slice(&ttl.to_be_bytes());
        out.extend_from_slice(&4u16.to_be_bytes());
        out.extend_from_slice(&ip.octets());
    }
    out
}

/// A standard query for `name` and `qtype`, as a stub resolver sends it (for testing the server
/// itself).
pub fn query(id: u16, name: &str, qtype: u16) -> Vec<u8> {
    let mut out = Vec::new();
    for word in [id, 0x0100, 1, 0, 0, 0] {
        out.extend_from_slice(&word.to_be_bytes());
    }
    for label in name.split('.').filter(|l| !l.is_empty()) {
        out.push(u8::try_from(label.len()).expect("a short label"));
        out.extend_from_slice(label.as_bytes());
    }
    out.push(0);
    out.extend_from_slice(&qtype.to_be_bytes());
    out.extend_from_slice(&CLASS_IN.to_be_bytes());
    out
}
