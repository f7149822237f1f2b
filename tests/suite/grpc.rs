//! gRPC through Gatehouse: a tonic client over h2c to the proxy, a tonic server behind it on an
//! h2c upstream. Unary and bidirectional streaming calls, with grpc-status (a trailer) intact,
//! errors included. The service is written by hand (no protoc): two prost messages and the
//! routing that tonic-build would generate.

use std::convert::Infallible;
use std::task::{Context, Poll};

use tonic::codegen::{http, BoxFuture, Service};
use tonic::server::NamedService;
use tonic::{Code, Request, Response, Status, Streaming};

use crate::support::h2::H2C_CONFIG;
use crate::support::{route_toml, within, Proxy};

#[derive(Clone, PartialEq, prost::Message)]
pub struct Ping {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Pong {
    #[prost(string, tag = "1")]
    pub text: String,
    #[prost(uint32, tag = "2")]
    pub seq: u32,
}

const UNARY: &str = "/test.Echo/Unary";
const CHAT: &str = "/test.Echo/Chat";

#[derive(Clone, Default)]
struct EchoServer;

impl NamedService for EchoServer {
    const NAME: &'static str = "test.Echo";
}

struct Unary;

impl Service<Request<Ping>> for Unary {
    type Response = Response<Pong>;
    type Error = Status;
    type Future = BoxFuture<Response<Pong>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Ping>) -> Self::Future {
        Box::pin(async move {
            let ping = req.into_inner();
            if ping.text == "fail" {
                return Err(Status::not_found("no such thing"));
            }
            Ok(Response::new(Pong {
                text: format!("pong: {}", ping.text),
                seq: ping.seq + 1,
            }))
        })
    }
}

struct Chat;

type PongStream = std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<Pong, Status>> + Send>>;

impl Service<Request<Streaming<Ping>>> for Chat {
    type Response = Response<PongStream>;
    type Error = Status;
    type Future = BoxFuture<Response<PongStream>, Status>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Status>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<Streaming<Ping>>) -> Self::Future {
        Box::pin(async move {
            let inbound = req.into_inner();
            // One answer per message, as each arrives: the client waits for each before it
            // sends the next, so nothing here may wait for the end of the request.
            let out = futures_util::stream::unfold(inbound, |mut inbound| async move {
                match inbound.message().await {
                    Ok(Some(ping)) => Some((
                        Ok(Pong {
                            text: format!("re: {}", ping.text),
                            seq: ping.seq,
                        }),
                        inbound,
                    )),
                    Ok(None) => None,
                    Err(status) => Some((Err(status), inbound)),
                }
            });
            Ok(Response::new(Box::pin(out) as PongStream))
        })
    }
}

impl Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Infallible>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
        match req.uri().path() {
            UNARY => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.unary(Unary, req).await)
            }),
            CHAT => Box::pin(async move {
                let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
                Ok(grpc.streaming(Chat, req).await)
            }),
            _ => Box::pin(async move { Ok(Status::unimplemented("no such method").into_http()) }),
        }
    }
}

/// A tonic server on 127.0.0.1:0 (HTTP/2 only, cleartext).
async fn start_server() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer)
            .serve_with_incoming(incoming)
            .await;
    });
    addr
}

async fn grpc_proxy() -> Proxy {
    let server = start_server().await;
    Proxy::start_toml(&format!(
        "{H2C_CONFIG}[upstream.grpc]\nservers = [\"{server}\"]\nprotocol = \"h2c\"\n\n{}",
        route_toml("/", "grpc")
    ))
    .await
}

async fn client(proxy: &Proxy) -> tonic::client::Grpc<tonic::transport::Channel> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", proxy.addr()))
        .unwrap()
        .connect()
        .await
        .expect("connecting to the proxy");
    tonic::client::Grpc::new(channel)
}

#[tokio::test]
async fn unary_calls_and_their_status_pass_through() {
    let proxy = grpc_proxy().await;
    let mut grpc = client(&proxy).await;
    grpc.ready().await.unwrap();
    let reply: Response<Pong> = within(
        "unary call",
        grpc.unary(
            Request::new(Ping {
                text: "hello".into(),
                seq: 41,
            }),
            http::uri::PathAndQuery::from_static(UNARY),
            tonic_prost::ProstCodec::default(),
        ),
    )
    .await
    .expect("the call succeeds");
    let pong = reply.into_inner();
    assert_eq!((pong.text.as_str(), pong.seq), ("pong: hello", 42));

    // An error travels as grpc-status and grpc-message, in a trailers-only response.
    grpc.ready().await.unwrap();
    let failed: Result<Response<Pong>, Status> = within(
        "failing unary call",
        grpc.unary(
            Request::new(Ping {
                text: "fail".into(),
                seq: 0,
            }),
            http::uri::PathAndQuery::from_static(UNARY),
            tonic_prost::ProstCodec::default(),
        ),
    )
    .await;
    let status = failed.expect_err("the server said NOT_FOUND");
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no such thing");

    grpc.ready().await.unwrap();
    let unknown: Result<Response<Pong>, Status> = grpc
        .unary(
            Request::new(Ping::default()),
            http::uri::PathAndQuery::from_static("/test.Echo/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::Unimplemented);
}

#[tokio::test]
async fn bidirectional_streaming_interleaves_and_ends_with_ok() {
    let proxy = grpc_proxy().await;
    let mut grpc = client(&proxy).await;
    grpc.ready().await.unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<Ping>(1);
    let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|ping| (ping, rx))
    });
    tx.send(Ping {
        text: "m0".into(),
        seq: 0,
    })
    .await
    .unwrap();
    let response: Response<Streaming<Pong>> = within(
        "opening the stream",
        grpc.streaming(
            Request::new(outbound),
            http::uri::PathAndQuery::from_static(CHAT),
            tonic_prost::ProstCodec::default(),
        ),
    )
    .await
    .expect("the call opens");
    let mut inbound = response.into_inner();
    // Each answer comes before the next message is sent: the proxy relays both directions
    // at once, it does not wait for the request to end.
    for seq in 0..20u32 {
        let pong = within("an answer", inbound.message())
            .await
            .expect("a message, not an error")
            .expect("the stream goes on");
        assert_eq!((pong.text, pong.seq), (format!("re: m{seq}"), seq));
        if seq < 19 {
            tx.send(Ping {
                text: format!("m{}", seq + 1),
                seq: seq + 1,
            })
            .await
            .unwrap();
        }
    }
    drop(tx);
    let end = within("the end of the stream", inbound.message())
        .await
        .expect("grpc-status 0 in the trailers");
    assert!(end.is_none());
    let trailers = within("trailers", inbound.trailers())
        .await
        .expect("trailers");
    // tonic reads grpc-status itself and returns Ok(None) above only for status 0; the rest
    // of the trailers are handed over.
    assert!(trailers.is_some_and(|t| t.get("grpc-status").is_none_or(|s| s == "0")));
}
