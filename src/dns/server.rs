//! The DNS side of `registrar dns`: questions in, answers from the current
//! [`Zone`] out.
//!
//! TCP is hickory-server's (framing, idle timeouts, one task per
//! connection). UDP is a loop of our own over the socket, as NSD's: up to
//! 32 queued questions per recvmmsg, their answers back with one sendmmsg.
//! A plain question (one, class IN, its name uncompressed, EDNS0 at most:
//! nearly all of them) is read from its bytes and looked up by them; a
//! positive answer to it is put together from record chunks the zone
//! encoded when it changed (see [`Zone::wired`]), so it costs a hash lookup
//! and a copy. Every other question, and every negative or truncated
//! answer, goes through hickory's decoding and encoding. hickory-server's
//! own UDP path (a task and a channel per question, every answer encoded)
//! measured at 0.36 of NSD's rate at 10,000 hosts on the same machine; this
//! loop matches it, and its latency too (docs/PERFORMANCE.md).

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record, RecordType};
use hickory_server::proto::serialize::binary::{
    BinDecodable, BinDecoder, BinEncodable, BinEncoder,
};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::{MessageResponse, MessageResponseBuilder};
use tokio_util::sync::CancellationToken;

use super::zone::{Answer, Zone};
use crate::telemetry::{DnsMetrics, QueryLabels};

/// The largest UDP answer sent, whatever a client's EDNS0 offers (the
/// DNS flag day 2020 size, which avoids IP fragmentation).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// The zone being served, read by every question. `None` until the
/// registry has been read once.
#[derive(Default)]
pub struct Published(RwLock<Option<Arc<Zone>>>);

impl Published {
    pub fn current(&self) -> Option<Arc<Zone>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Replaces the zone.
    pub fn set(&self, zone: Zone) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(zone));
    }

    /// Changes the zone in place. Questions in flight keep the zone they
    /// started with: if one still holds it, the change goes to a copy.
    pub fn update(&self, change: impl FnOnce(&mut Zone)) {
        let mut guard = self.0.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(zone) = guard.as_mut() {
            change(Arc::make_mut(zone));
        }
    }
}

/// Answers questions from the published zone.
pub struct Handler {
    zone: Arc<Published>,
    metrics: DnsMetrics,
    /// The counters of the common answers (A, AAAA, SRV with NOERROR),
    /// looked up once rather than per question.
    common: [(RecordType, prometheus_client::metrics::counter::Counter); 3],
    /// An answer over TCP did not fit in 64 KiB (said once).
    tcp_truncated: std::sync::atomic::AtomicBool,
}

/// The rcode as DNS tools print it (dig's `status:`).
fn rcode_label(rcode: ResponseCode) -> &'static str {
    match rcode {
        ResponseCode::NoError => "NOERROR",
        ResponseCode::NXDomain => "NXDOMAIN",
        ResponseCode::ServFail => "SERVFAIL",
        ResponseCode::Refused => "REFUSED",
        ResponseCode::FormErr => "FORMERR",
        ResponseCode::NotImp => "NOTIMP",
        ResponseCode::BADVERS => "BADVERS",
        _ => "OTHER",
    }
}

/// RFC 6891: a question with EDNS gets EDNS back; its size bounds a UDP
/// answer.
fn response_edns(request: &Request) -> Option<Edns> {
    request.edns.as_ref().map(|asked| {
        let mut e = Edns::new();
        e.set_max_payload(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
        e.set_version(0);
        e
    })
}

/// What answers a question, before encoding.
#[derive(Debug)]
struct Outcome {
    rcode: ResponseCode,
    answers: Vec<Record>,
    /// The SOA, for the authority section of a negative answer.
    soa: Option<Record>,
    additionals: Vec<Record>,
}

impl Default for Outcome {
    fn default() -> Outcome {
        Outcome {
            rcode: ResponseCode::NoError,
            answers: Vec::new(),
            soa: None,
            additionals: Vec::new(),
        }
    }
}

type Reply<'q, 'a> = MessageResponse<
    'q,
    'a,
    std::vec::IntoIter<&'a Record>,
    std::option::IntoIter<&'a Record>,
    std::option::IntoIter<&'a Record>,
    std::vec::IntoIter<&'a Record>,
>;

impl Handler {
    pub fn new(zone: Arc<Published>, metrics: DnsMetrics) -> Handler {
        let common = [RecordType::A, RecordType::AAAA, RecordType::SRV].map(|t| {
            let counter = metrics
                .queries
                .get_or_create(&QueryLabels {
                    qtype: t.into(),
                    rcode: rcode_label(ResponseCode::NoError),
                })
                .clone();
            (t, counter)
        });
        Handler {
            zone,
            metrics,
            common,
            tcp_truncated: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// What answers `request` from `zone`, before encoding.
    fn outcome(&self, request: &Request, zone: Option<&Zone>) -> Outcome {
        let query = match request.queries.queries() {
            [q] => Some(q),
            _ => None,
        };
        let only = |rcode| Outcome {
            rcode,
            ..Outcome::default()
        };
        let negative = |rcode, zone: &Zone| Outcome {
            rcode,
            soa: Some(zone.soa().clone()),
            ..Outcome::default()
        };
        match (zone, query) {
            _ if request.metadata.op_code != OpCode::Query => only(ResponseCode::NotImp),
            _ if request.edns.as_ref().is_some_and(|e| e.version() > 0) => {
                only(ResponseCode::BADVERS)
            }
            (_, None) => only(ResponseCode::FormErr),
            // Not read yet: say so rather than deny names that may exist.
            (None, Some(_)) => only(ResponseCode::ServFail),
            (Some(_), Some(q)) if q.query_class() != DNSClass::IN => only(ResponseCode::Refused),
            (Some(zone), Some(q)) => match zone.lookup(q.name(), q.query_type()) {
                Answer::Refused => only(ResponseCode::Refused),
                Answer::NxDomain => negative(ResponseCode::NXDomain, zone),
                Answer::NoData => negative(ResponseCode::NoError, zone),
                Answer::Found {
                    answers,
                    additionals,
                } => Outcome {
                    rcode: ResponseCode::NoError,
                    answers,
                    soa: None,
                    additionals,
                },
            },
        }
    }

    /// `outcome` as a response to `request`, for hickory to encode.
    fn reply<'q, 'a>(
        request: &'q Request,
        edns: Option<&'q Edns>,
        outcome: &'a Outcome,
    ) -> Reply<'q, 'a> {
        let builder = MessageResponseBuilder::new(&request.queries, edns);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.response_code = outcome.rcode;
        metadata.authoritative = matches!(
            outcome.rcode,
            ResponseCode::NoError | ResponseCode::NXDomain
        );
        builder.build(
            metadata,
            outcome.answers.iter().collect::<Vec<_>>(),
            None,
            outcome.soa.as_ref(),
            outcome.additionals.iter().collect::<Vec<_>>(),
        )
    }

    fn count(&self, qtype: Option<RecordType>, rcode: ResponseCode, started: Instant) {
        match self.common.iter().find(|(t, _)| Some(*t) == qtype) {
            Some((_, counter)) if rcode == ResponseCode::NoError => {
                counter.inc();
            }
            _ => {
                self.metrics
                    .queries
                    .get_or_create(&QueryLabels {
                        qtype: qtype.map_or("none", <&'static str>::from),
                        rcode: rcode_label(rcode),
                    })
                    .inc();
            }
        }
        self.metrics
            .answer_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// The bytes answering one UDP datagram from `zone`, or None when it
    /// gets no answer (too short to be DNS, or itself a response: never
    /// reflect).
    fn answer_datagram(
        &self,
        packet: &[u8],
        src: SocketAddr,
        zone: Option<&Zone>,
    ) -> Option<Vec<u8>> {
        let started = Instant::now();
        let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
        if header.metadata.message_type != hickory_server::proto::op::MessageType::Query {
            return None;
        }
        let mut name = [0u8; 255];
        if let Some(plain) = Plain::read(packet, &header, &mut name)
            && let Some(bytes) = zone.and_then(|z| splice(packet, &header, &plain, z))
        {
            self.count(Some(plain.qtype), ResponseCode::NoError, started);
            return Some(bytes);
        }
        let mut bytes = Vec::with_capacity(512);
        let request = match Request::from_bytes(packet.to_vec(), src, Protocol::Udp) {
            Ok(r) => r,
            Err(_) => {
                let mut metadata = Metadata::response_from_request(&header.metadata);
                metadata.response_code = ResponseCode::FormErr;
                let reply = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                reply.emit(&mut BinEncoder::new(&mut bytes)).ok()?;
                return Some(bytes);
            }
        };
        let edns = response_edns(&request);
        let limit = edns.as_ref().map_or(512, |e| e.max_payload());
        let outcome = self.outcome(&request, zone);
        let reply = Handler::reply(&request, edns.as_ref(), &outcome);
        let mut encoder = BinEncoder::new(&mut bytes);
        encoder.set_max_size(limit);
        let rcode = match reply.destructive_emit(&mut encoder) {
            Ok(info) => info.response_code,
            Err(e) => {
                tracing::debug!(error = %e, "could not encode an answer");
                bytes.clear();
                let mut metadata = Metadata::response_from_request(&request.metadata);
                metadata.response_code = ResponseCode::ServFail;
                let reply = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                reply.emit(&mut BinEncoder::new(&mut bytes)).ok()?;
                ResponseCode::ServFail
            }
        };
        self.count(question_type(&request), rcode, started);
        Some(bytes)
    }
}

/// The type of `request`'s (first) question, for the metrics.
fn question_type(request: &Request) -> Option<RecordType> {
    request.queries.queries().first().map(|q| q.query_type())
}

/// A question of the plain kind nearly every one is, read from the
/// datagram's bytes: a standard query, one question of class IN whose name
/// is not compressed, and nothing else but an EDNS0 OPT record (version
/// 0). Any other datagram is decoded by hickory.
struct Plain<'n> {
    /// The question's name as a zone [`Key`](super::zone::Key): its wire
    /// form, lowercased.
    key: &'n [u8],
    qtype: RecordType,
    /// Where the question section ends.
    question_end: usize,
    /// The answer's size limit, and whether it carries an OPT record
    /// (the question did; RFC 6891).
    limit: usize,
    edns: bool,
}

impl<'n> Plain<'n> {
    fn read(packet: &[u8], header: &Header, name: &'n mut [u8; 255]) -> Option<Plain<'n>> {
        let counts = &header.counts;
        if header.metadata.op_code != OpCode::Query
            || counts.queries != 1
            || counts.answers != 0
            || counts.authorities != 0
            || counts.additionals > 1
        {
            return None;
        }
        let mut at = 12;
        let mut len = 0;
        loop {
            let label = usize::from(*packet.get(at)?);
            // A compression pointer (or a reserved label type).
            if label & 0xc0 != 0 || len + label + 1 > name.len() {
                return None;
            }
            let bytes = packet.get(at..at + 1 + label)?;
            for (to, from) in name[len..len + 1 + label].iter_mut().zip(bytes) {
                *to = from.to_ascii_lowercase();
            }
            len += 1 + label;
            at += 1 + label;
            if label == 0 {
                break;
            }
        }
        let u16_at = |i: usize| Some(u16::from_be_bytes([*packet.get(i)?, *packet.get(i + 1)?]));
        let qtype = RecordType::from(u16_at(at)?);
        if DNSClass::from(u16_at(at + 2)?) != DNSClass::IN {
            return None;
        }
        let question_end = at + 4;
        let (limit, edns) = if counts.additionals == 0 {
            (packet.len() == question_end).then_some((512, false))?
        } else {
            // OPT: the root name, type 41, the payload size as its class,
            // extended rcode, version, flags, then options (not used).
            let opt = packet.get(question_end..)?;
            let rdlen = usize::from(u16_at(question_end + 9)?);
            let plain = opt.first() == Some(&0)
                && u16_at(question_end + 1) == Some(41)
                && opt.get(6) == Some(&0)
                && opt.len() == 11 + rdlen;
            let payload = u16_at(question_end + 3)?;
            (plain.then_some((usize::from(payload.clamp(512, MAX_UDP_PAYLOAD)), true)))?
        };
        Some(Plain {
            key: &name[..len],
            qtype,
            question_end,
            limit,
            edns,
        })
    }
}

/// A positive answer to an A, AAAA or SRV question put together from the
/// zone's chunks: the header, the question as asked (its case kept, as
/// resolvers that randomise it check), the chunks, and EDNS. None when the
/// question needs encoding (a negative answer, an odd question) or the
/// answer records do not fit the client's limit (encoding truncates them
/// and sets TC).
fn splice(packet: &[u8], header: &Header, question: &Plain<'_>, zone: &Zone) -> Option<Vec<u8>> {
    let wired = zone.wired(question.key, question.qtype)?;
    // An OPT record with no options: the root name, type 41, our payload
    // size, extended rcode 0, version 0, no flags, no data.
    let opt = question.edns.then(|| {
        let [hi, lo] = (question.limit as u16).to_be_bytes();
        [0, 0, 41, hi, lo, 0, 0, 0, 0, 0, 0]
    });
    let opt_len = opt.as_ref().map_or(0, |o| o.len());
    let mut size =
        question.question_end + wired.answers.iter().map(|c| c.len()).sum::<usize>() + opt_len;
    if size > question.limit {
        return None;
    }
    // Additional records that do not fit are left out, without TC (RFC
    // 2181 section 9): the answer is complete, and the client can ask for
    // a target's address by itself.
    let mut additionals: Vec<&[u8]> = Vec::with_capacity(wired.additionals.len());
    for c in &wired.additionals {
        if size + c.len() > question.limit {
            break;
        }
        size += c.len();
        additionals.push(c);
    }
    let mut out = Vec::with_capacity(size);
    let mut encoder = BinEncoder::new(&mut out);
    let mut metadata = Metadata::response_from_request(&header.metadata);
    metadata.authoritative = true;
    let counts = HeaderCounts {
        queries: 1,
        answers: u16::try_from(wired.answers.len()).ok()?,
        authorities: 0,
        additionals: u16::try_from(additionals.len() + usize::from(opt.is_some())).ok()?,
    };
    Header { metadata, counts }.emit(&mut encoder).ok()?;
    out.extend_from_slice(&packet[12..question.question_end]);
    for c in wired.answers.iter().chain(&additionals) {
        out.extend_from_slice(c);
    }
    if let Some(opt) = &opt {
        out.extend_from_slice(opt);
    }
    Some(out)
}

/// Datagrams taken from the socket, and answers given to it, per system
/// call (recvmmsg and sendmmsg): under load the kernel has many queued, and
/// one call per datagram costs more than answering it.
const BATCH: usize = 32;

/// The largest question read; a longer datagram is not one we answer.
const MAX_QUESTION: usize = 4096;

fn std_addr(addr: &nix::sys::socket::SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = addr.as_sockaddr_in() {
        return Some(SocketAddr::from(std::net::SocketAddrV4::from(*v4)));
    }
    addr.as_sockaddr_in6()
        .map(|v6| SocketAddr::from(std::net::SocketAddrV6::from(*v6)))
}

/// Takes up to `BATCH` queued datagrams without waiting: their lengths and
/// senders, in `bufs` order.
fn receive_batch(
    fd: std::os::fd::RawFd,
    bufs: &mut [Vec<u8>],
) -> std::io::Result<Vec<(usize, Option<SocketAddr>)>> {
    use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrStorage, recvmmsg};
    // Headers hold raw pointers (not Send): made per call, never held
    // across an await.
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(bufs.len(), None);
    let mut slices: Vec<[std::io::IoSliceMut<'_>; 1]> = bufs
        .iter_mut()
        .map(|b| [std::io::IoSliceMut::new(b)])
        .collect();
    let received = recvmmsg(
        fd,
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    )
    .map_err(std::io::Error::from)?;
    Ok(received
        .map(|m| (m.bytes, m.address.as_ref().and_then(std_addr)))
        .collect())
}

/// Gives `answers` to the socket in one call when it can; returns how many
/// went.
fn send_batch(fd: std::os::fd::RawFd, answers: &[(Vec<u8>, SocketAddr)]) -> std::io::Result<usize> {
    use nix::sys::socket::{ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage, sendmmsg};
    if answers.is_empty() {
        return Ok(0);
    }
    let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(answers.len(), None);
    let slices: Vec<[std::io::IoSlice<'_>; 1]> = answers
        .iter()
        .map(|(bytes, _)| [std::io::IoSlice::new(bytes)])
        .collect();
    let addrs: Vec<Option<SockaddrStorage>> = answers
        .iter()
        .map(|(_, to)| Some(SockaddrStorage::from(*to)))
        .collect();
    let none: [ControlMessage<'_>; 0] = [];
    let sent = sendmmsg(
        fd,
        &mut headers,
        slices.iter(),
        addrs,
        none,
        MsgFlags::MSG_DONTWAIT,
    )
    .map_err(std::io::Error::from)?;
    Ok(sent.count())
}

/// Answers every datagram on `socket` until `cancel`.
///
/// The socket is watched for readability only. Watched for writability as
/// well (as a `tokio::net::UdpSocket` is), every answer sent wakes the loop
/// once more for nothing: one more `epoll_wait` per question, about a tenth
/// of its cost. A batch shorter than `BATCH` emptied the queue, so the loop
/// waits at once rather than asking again to be told `EAGAIN`: a datagram
/// that arrives meanwhile is a new readiness event, which `clear_ready`
/// leaves alone.
pub async fn serve_udp(
    socket: tokio::net::UdpSocket,
    handler: Arc<Handler>,
    cancel: CancellationToken,
) {
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let socket = match socket.into_std().and_then(|s| watch(s, Interest::READABLE)) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot watch a DNS socket; its questions go unanswered");
            return;
        }
    };
    let fd = socket.as_raw_fd();
    let mut bufs = vec![vec![0u8; MAX_QUESTION]; BATCH];
    let mut failures = crate::backoff::Outage::new("cannot use a DNS socket");
    loop {
        let mut ready = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.readable() => match r {
                Ok(ready) => ready,
                Err(e) => {
                    failures.failed(&e);
                    continue;
                }
            },
        };
        let batch = match receive_batch(fd, &mut bufs) {
            Ok(batch) => {
                if let Some(ended) = failures.recovered() {
                    tracing::info!("the DNS socket works again {}", ended.describe());
                }
                if batch.len() < BATCH {
                    ready.clear_ready();
                }
                batch
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                ready.clear_ready();
                continue;
            }
            // ICMP errors surface here on Linux; the next datagram is fine.
            Err(e) => {
                failures.failed(&e);
                continue;
            }
        };
        let zone = handler.zone.current();
        let answers: Vec<(Vec<u8>, SocketAddr)> = batch
            .into_iter()
            .zip(&bufs)
            .filter_map(|((n, src), buf)| {
                let src = src?;
                // A datagram that filled the buffer was cut: not a question.
                if n >= MAX_QUESTION {
                    return None;
                }
                Some((
                    handler.answer_datagram(&buf[..n], src, zone.as_deref())?,
                    src,
                ))
            })
            .collect();
        let sent = match send_batch(fd, &answers) {
            Ok(sent) => sent,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
            Err(e) => {
                tracing::debug!(error = %e, "could not send answers");
                continue;
            }
        };
        if sent < answers.len() {
            send_rest(socket.get_ref(), &answers[sent..]).await;
        }
    }
}

/// `socket` registered with the runtime for `interest` alone.
///
/// `AsyncFd::with_interest` is deprecated because a generic `T` may close
/// its descriptor while registered. A `std::net::UdpSocket` owns its
/// descriptor, and it stays open until the `AsyncFd` is dropped, which
/// deregisters it first. The replacement, `register_with_interest`, is
/// `unsafe`, which this crate forbids.
#[allow(deprecated)]
fn watch(
    socket: std::net::UdpSocket,
    interest: tokio::io::Interest,
) -> std::io::Result<tokio::io::unix::AsyncFd<std::net::UdpSocket>> {
    tokio::io::unix::AsyncFd::with_interest(socket, interest)
}

/// How long answers the socket would not take wait for room; then they
/// are dropped, as a full network drops them, and the client asks again.
const SEND_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends `answers` one by one as the socket's buffer makes room. The loop's
/// descriptor is not watched for writability (see [`serve_udp`]), so this
/// waits on a second descriptor of the same socket, watched only while it
/// waits.
async fn send_rest(socket: &std::net::UdpSocket, answers: &[(Vec<u8>, SocketAddr)]) {
    use tokio::io::Interest;
    let writer = match socket
        .try_clone()
        .and_then(|s| watch(s, Interest::WRITABLE))
    {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, dropped = answers.len(), "cannot wait to send answers");
            return;
        }
    };
    let send = async {
        for (answer, to) in answers {
            let sent = writer
                .async_io(Interest::WRITABLE, |s| s.send_to(answer, to))
                .await;
            if let Err(e) = sent {
                tracing::debug!(%to, error = %e, "could not send an answer");
            }
        }
    };
    if tokio::time::timeout(SEND_WAIT, send).await.is_err() {
        tracing::debug!("the DNS socket had no room for answers within 1s; dropped");
    }
}

/// TCP, through hickory-server.
#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        let edns = response_edns(request);
        let zone = self.zone.current();
        let outcome = self.outcome(request, zone.as_deref());
        let reply = Handler::reply(request, edns.as_ref(), &outcome);
        let info = match response.send_response(reply).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "could not send an answer");
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(Header {
                    metadata: failed,
                    counts: HeaderCounts::default(),
                })
            }
        };
        // This handler answers TCP (UDP has its own path): an answer cut
        // here did not fit in a DNS message at all.
        if info.truncation
            && !self
                .tcp_truncated
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            let question = request
                .queries
                .queries()
                .first()
                .map_or(String::new(), |q| {
                    format!("{} {}", q.name(), q.query_type())
                });
            tracing::warn!(
                "the answer to {question} does not fit in one DNS message (64 KiB) even over TCP, so it was sent truncated (TC set); split the role, or ask for hosts by name (said once)"
            );
        }
        self.count(question_type(request), info.response_code, started);
        info
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::zone::Settings;
    use crate::registry::Registry;
    use hickory_server::proto::op::{Message, Query};
    use hickory_server::proto::rr::{LowerName, Name};

    fn zone() -> Zone {
        let mut r = Registry::default();
        for i in 0..20 {
            for (k, v) in [
                ("ip", format!("10.0.0.{i}")),
                ("health", "passing".to_string()),
                ("services/http", "8080".to_string()),
            ] {
                let key = format!("/p/dc1/web/host-{i}/{k}");
                r.put("/p", key.as_bytes(), v.as_bytes(), 1, 1).unwrap();
            }
        }
        Zone::build(
            &r,
            crate::etcd::Revision::of(9).expect("a revision"),
            Settings {
                domain: Name::from_ascii("registry.internal.").unwrap(),
                ttl: 5,
                allow_warning: false,
                srv_min: Default::default(),
                ns: Name::from_ascii("ns.registry.internal.").unwrap(),
                ns_addrs: Vec::new(),
            },
        )
    }

    fn ask(handler: &Handler, name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
        let mut m = Message::query();
        m.metadata.id = 4242;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
        if let Some(size) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            m.set_edns(e);
        }
        let packet = m.to_vec().unwrap();
        let bytes = handler
            .answer_datagram(
                &packet,
                "127.0.0.1:5353".parse().unwrap(),
                handler.zone.current().as_deref(),
            )
            .expect("an answer");
        Message::from_vec(&bytes).expect("a DNS message")
    }

    fn data(records: &[Record]) -> Vec<String> {
        let mut v: Vec<String> = records
            .iter()
            .map(|r| format!("{} {} {}", r.name, r.record_type(), r.data).to_lowercase())
            .collect();
        v.sort();
        v
    }

    /// Answers put together from chunks decode to what encoding gives: the
    /// same records (owner names in the question's case), the question as
    /// asked, the id, the flags.
    #[test]
    fn spliced_answers_decode_as_encoded_ones() {
        let zone = zone();
        let handler = Handler::new(Arc::new(Published::default()), DnsMetrics::new());
        handler.zone.set(zone.clone());
        for (name, qtype) in [
            ("Host-7.WEB.dc1.registry.internal.", RecordType::A),
            ("web.dc1.registry.internal.", RecordType::A),
            ("_http._tcp.web.DC1.registry.internal.", RecordType::SRV),
        ] {
            // 20 SRV records need EDNS0; the addresses fit 512 bytes.
            let sizes = if qtype == RecordType::SRV {
                vec![Some(4096)]
            } else {
                vec![None, Some(4096)]
            };
            for edns in sizes {
                let got = ask(&handler, name, qtype, edns);
                assert_eq!(got.metadata.id, 4242);
                assert!(got.metadata.authoritative && got.metadata.recursion_desired);
                assert!(!got.metadata.truncation, "{name} {edns:?}");
                assert_eq!(got.queries[0].name().to_ascii(), name);
                assert_eq!(got.edns.is_some(), edns.is_some());
                let Answer::Found {
                    answers,
                    additionals,
                } = zone.lookup(&LowerName::from(Name::from_ascii(name).unwrap()), qtype)
                else {
                    panic!("{name}: no answer")
                };
                assert_eq!(data(&got.answers), data(&answers), "{name} {edns:?}");
                // Additional records: those that fit, each a target's address.
                let all = data(&additionals);
                for r in data(&got.additionals) {
                    assert!(all.contains(&r), "{r} is not a target of {name}");
                }
                if qtype == RecordType::SRV {
                    assert!(!got.additionals.is_empty());
                }
            }
        }
        // 20 SRV records do not fit 512 bytes: encoding truncates (TC).
        let got = ask(
            &handler,
            "_http._tcp.web.dc1.registry.internal.",
            RecordType::SRV,
            None,
        );
        assert!(got.metadata.truncation);
    }

    fn packet(name: &str, edns: Option<(u16, u8)>) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = 7;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
        if let Some((size, version)) = edns {
            let mut e = Edns::new();
            e.set_max_payload(size);
            e.set_version(version);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    fn plain(packet: &[u8]) -> Option<(Vec<u8>, RecordType, usize, bool)> {
        let header = Header::read(&mut BinDecoder::new(packet)).unwrap();
        let mut name = [0u8; 255];
        Plain::read(packet, &header, &mut name).map(|p| (p.key.to_vec(), p.qtype, p.limit, p.edns))
    }

    /// The bytes-level reading of a question takes the plain ones, keyed as
    /// the zone keys names, and leaves every other kind to hickory.
    #[test]
    fn plain_questions_are_read_from_bytes_and_odd_ones_left_to_hickory() {
        let want = crate::dns::zone::name_key(&Name::from_ascii("web.dc1.example.").unwrap());
        let got = plain(&packet("WEB.Dc1.example.", None)).expect("plain");
        assert_eq!(got, (want.to_vec(), RecordType::A, 512, false));
        // EDNS0: its size, within 512..=1232.
        let got = plain(&packet("web.dc1.example.", Some((4096, 0)))).expect("plain");
        assert_eq!((got.2, got.3), (1232, true));
        let got = plain(&packet("web.dc1.example.", Some((100, 0)))).expect("plain");
        assert_eq!((got.2, got.3), (512, true));
        // EDNS version 1 is hickory's to refuse (BADVERS).
        assert_eq!(plain(&packet("web.dc1.example.", Some((1232, 1)))), None);
        let handler = Handler::new(Arc::new(Published::default()), DnsMetrics::new());
        handler.zone.set(zone());
        let bytes = handler
            .answer_datagram(
                &packet("web.dc1.registry.internal.", Some((1232, 1))),
                "127.0.0.1:5353".parse().unwrap(),
                handler.zone.current().as_deref(),
            )
            .expect("an answer");
        let answer = Message::from_vec(&bytes).expect("a DNS message");
        // BADVERS and BADSIG share the code 16; a decoder names it BADSIG.
        assert_eq!(
            u16::from(answer.metadata.response_code),
            u16::from(ResponseCode::BADVERS)
        );
        // Bytes after the question, and a compressed question name.
        let mut trailing = packet("web.dc1.example.", None);
        trailing.push(0);
        assert_eq!(plain(&trailing), None);
        let mut compressed = packet("a.", None);
        let end = compressed.len();
        compressed.splice(12..end, [0xc0, 12, 0, 1, 0, 1]);
        assert_eq!(plain(&compressed), None);
        // Cut short anywhere: never a panic, never a question.
        let whole = packet("web.dc1.example.", Some((1232, 0)));
        for n in 12..whole.len() {
            assert_eq!(plain(&whole[..n]), None, "cut at {n}");
        }
    }
}
