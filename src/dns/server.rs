//! The DNS side of `registrar dns`: questions in, answers from the current
//! [`Zone`] out.
//!
//! TCP is hickory-server's (framing, idle timeouts, one task per
//! connection). UDP is a loop of our own over the socket: receive, answer,
//! send, with hickory's decoding and encoding (truncation to the client's
//! limit included). hickory-server's UDP path spawns a task and passes each
//! answer through a channel to a sender task; that measured at a third of
//! NSD's rate on the same machine, and answering in the loop doubles it.

use std::net::SocketAddr;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use hickory_server::net::runtime::Time;
use hickory_server::net::xfer::Protocol;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record};
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
    pub zone: Arc<Published>,
    pub metrics: DnsMetrics,
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

type Reply<'q, 'a> = MessageResponse<
    'q,
    'a,
    std::vec::IntoIter<&'a Record>,
    std::option::IntoIter<&'a Record>,
    std::option::IntoIter<&'a Record>,
    std::vec::IntoIter<&'a Record>,
>;

impl Handler {
    /// The answer to `request` from `zone`.
    fn reply<'q, 'a>(
        &self,
        request: &'q Request,
        edns: Option<&'q Edns>,
        zone: Option<&'a Zone>,
    ) -> Reply<'q, 'a> {
        let builder = MessageResponseBuilder::new(&request.queries, edns);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let query = match request.queries.queries() {
            [q] => Some(q),
            _ => None,
        };
        let (rcode, answers, soa, additionals): (_, Vec<&Record>, Option<&Record>, Vec<&Record>) =
            match (zone, query) {
                _ if request.metadata.op_code != OpCode::Query => {
                    (ResponseCode::NotImp, vec![], None, vec![])
                }
                _ if request.edns.as_ref().is_some_and(|e| e.version() > 0) => {
                    (ResponseCode::BADVERS, vec![], None, vec![])
                }
                (_, None) => (ResponseCode::FormErr, vec![], None, vec![]),
                // Not read yet: say so rather than deny names that may exist.
                (None, Some(_)) => (ResponseCode::ServFail, vec![], None, vec![]),
                (Some(_), Some(q)) if q.query_class() != DNSClass::IN => {
                    (ResponseCode::Refused, vec![], None, vec![])
                }
                (Some(zone), Some(q)) => match zone.lookup(q.name(), q.query_type()) {
                    Answer::Refused => (ResponseCode::Refused, vec![], None, vec![]),
                    Answer::NxDomain => (ResponseCode::NXDomain, vec![], Some(zone.soa()), vec![]),
                    Answer::NoData => (ResponseCode::NoError, vec![], Some(zone.soa()), vec![]),
                    Answer::Found {
                        answers,
                        additionals,
                    } => (ResponseCode::NoError, answers, None, additionals),
                },
            };
        metadata.response_code = rcode;
        metadata.authoritative = matches!(rcode, ResponseCode::NoError | ResponseCode::NXDomain);
        builder.build(metadata, answers, None, soa, additionals)
    }

    fn count(&self, request: &Request, rcode: ResponseCode, started: Instant) {
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("none", |q| <&'static str>::from(q.query_type()));
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                qtype,
                rcode: rcode_label(rcode),
            })
            .inc();
        self.metrics
            .answer_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// The bytes answering one UDP datagram, or None when it gets no answer
    /// (too short to be DNS, or itself a response: never reflect).
    fn answer_datagram(&self, packet: &[u8], src: SocketAddr) -> Option<Vec<u8>> {
        let started = Instant::now();
        let header = Header::read(&mut BinDecoder::new(packet)).ok()?;
        if header.metadata.message_type != hickory_server::proto::op::MessageType::Query {
            return None;
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
        let zone = self.zone.current();
        let reply = self.reply(&request, edns.as_ref(), zone.as_deref());
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
        self.count(&request, rcode, started);
        Some(bytes)
    }
}

/// Answers every datagram on `socket` until `cancel`.
pub async fn serve_udp(
    socket: tokio::net::UdpSocket,
    handler: Arc<Handler>,
    cancel: CancellationToken,
) {
    // A question is small; anything longer than this is not one we answer.
    let mut buf = vec![0u8; 4096];
    let mut failures = crate::backoff::Outage::new("cannot use a DNS socket");
    loop {
        let received = tokio::select! {
            _ = cancel.cancelled() => return,
            r = socket.recv_from(&mut buf) => r,
        };
        let (n, src) = match received {
            Ok(r) => {
                if let Some(ended) = failures.recovered() {
                    tracing::info!("the DNS socket works again {}", ended.describe());
                }
                r
            }
            // ICMP errors surface here on Linux; the next datagram is fine.
            Err(e) => {
                failures.failed(&e);
                continue;
            }
        };
        let Some(answer) = handler.answer_datagram(&buf[..n], src) else {
            continue;
        };
        if let Err(e) = socket.send_to(&answer, src).await {
            tracing::debug!(%src, error = %e, "could not send an answer");
        }
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
        let reply = self.reply(request, edns.as_ref(), zone.as_deref());
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
        self.count(request, info.response_code, started);
        info
    }
}
