//! The bare HTTP floor: a hyper server that answers every request with a
//! fixed 100-byte body, on the same runtime and connection settings as
//! kvstore. Benchmarks compare kvstore against it in the same run, since a
//! shared machine's round trip varies from run to run.
//!
//! Run with `cargo run --release --example http_floor -- 127.0.0.1:7099`
//! (Cargo.toml declares it as an example, so that the benchmark scripts
//! build it with `--examples`), then point wrk or `kvstore bench` at it.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioIo, TokioTimer};

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let address = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "127.0.0.1:7099".to_owned());
    let listener = tokio::net::TcpListener::bind(&address).await?;
    eprintln!("http_floor listening on {}", listener.local_addr()?);
    let body = Bytes::from(vec![b'x'; 100]);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let body = body.clone();
        tokio::spawn(async move {
            let service = service_fn(move |_: Request<hyper::body::Incoming>| {
                let body = body.clone();
                async move { Ok::<_, Infallible>(Response::new(Full::new(body))) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
