//! The DNS side of `registrar dns`: hickory-server owns the sockets (UDP
//! and TCP, truncation to the client's limit over UDP); [`Handler`] turns
//! each question into an answer from the current [`Zone`].

use std::sync::{Arc, PoisonError, RwLock};
use std::time::Instant;

use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::{DNSClass, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

use super::zone::{Answer, Zone};
use crate::telemetry::{DnsMetrics, QueryLabels};

/// The largest UDP answer sent, whatever a client's EDNS0 offers (the
/// DNS flag day 2020 size, which avoids IP fragmentation).
const MAX_UDP_PAYLOAD: u16 = 1232;

/// The zone being served: replaced whole after each registry change, read
/// by every query. `None` until the registry has been read once.
#[derive(Default)]
pub struct Published(RwLock<Option<Arc<Zone>>>);

impl Published {
    pub fn current(&self) -> Option<Arc<Zone>> {
        self.0
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn set(&self, zone: Zone) {
        *self.0.write().unwrap_or_else(PoisonError::into_inner) = Some(Arc::new(zone));
    }
}

/// Answers questions from the published zone.
pub struct Handler {
    pub zone: Arc<Published>,
    pub metrics: DnsMetrics,
}

impl Handler {
    fn count(&self, request: &Request, info: &ResponseInfo, started: Instant) {
        let qtype = request
            .queries
            .queries()
            .first()
            .map_or("none", |q| <&'static str>::from(q.query_type()));
        self.metrics
            .queries
            .get_or_create(&QueryLabels {
                qtype,
                rcode: rcode_label(info.response_code),
            })
            .inc();
        self.metrics
            .answer_seconds
            .observe(started.elapsed().as_secs_f64());
    }
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

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        mut response: R,
    ) -> ResponseInfo {
        let started = Instant::now();
        // RFC 6891: answer EDNS with EDNS; the size bounds a UDP answer.
        let edns = request.edns.as_ref().map(|asked| {
            let mut e = Edns::new();
            e.set_max_payload(asked.max_payload().clamp(512, MAX_UDP_PAYLOAD));
            e.set_version(0);
            e
        });
        let builder = MessageResponseBuilder::new(&request.queries, edns.as_ref());
        let mut metadata = Metadata::response_from_request(&request.metadata);
        metadata.authoritative = true;

        let zone = self.zone.current();
        let query = match request.queries.queries() {
            [q] => Some(q),
            _ => None,
        };
        let (rcode, answers, soa, additionals): (_, Vec<&Record>, Option<&Record>, Vec<&Record>) =
            match (&zone, query) {
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
                    Answer::Refused => {
                        metadata.authoritative = false;
                        (ResponseCode::Refused, vec![], None, vec![])
                    }
                    Answer::NxDomain => (ResponseCode::NXDomain, vec![], Some(zone.soa()), vec![]),
                    Answer::NoData => (ResponseCode::NoError, vec![], Some(zone.soa()), vec![]),
                    Answer::Found {
                        answers,
                        additionals,
                    } => (ResponseCode::NoError, answers, None, additionals),
                },
            };
        metadata.response_code = rcode;
        if rcode != ResponseCode::NoError && rcode != ResponseCode::NXDomain {
            metadata.authoritative = false;
        }
        let message = builder.build(metadata, answers, None, soa, additionals);
        let info = match response.send_response(message).await {
            Ok(info) => info,
            Err(e) => {
                tracing::debug!(error = %e, "could not send an answer");
                let mut failed = Metadata::response_from_request(&request.metadata);
                failed.response_code = ResponseCode::ServFail;
                ResponseInfo::from(hickory_server::proto::op::Header {
                    metadata: failed,
                    counts: Default::default(),
                })
            }
        };
        self.count(request, &info, started);
        info
    }
}
