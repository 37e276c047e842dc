//! A small HTTP/1 server for `/metrics`, `/healthz` and whatever else a
//! subcommand routes (the registry's status page). One task accepts; one
//! task per connection; all of them end when `shutdown` resolves.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What a route answers.
pub type Reply = Response<String>;

/// Answers one request (path and query are all it needs).
pub type Handler =
    Arc<dyn Fn(Request<Incoming>) -> Pin<Box<dyn Future<Output = Reply> + Send>> + Send + Sync>;

/// A reply with `status`, `content_type` and `body`.
pub fn reply(status: StatusCode, content_type: &str, body: String) -> Reply {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    if let Ok(value) = content_type.parse() {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

/// `404 Not Found`.
pub fn not_found() -> Reply {
    reply(
        StatusCode::NOT_FOUND,
        "text/plain; charset=utf-8",
        "not found\n".into(),
    )
}

/// Serves `handler` on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::debug!(%error, "metrics listener accept failed");
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let handler = handler.clone();
        let mut stopped = stopped.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| {
                let handler = handler.clone();
                async move { Ok::<_, Infallible>(handler(request).await) }
            });
            let connection = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => {}
                _ = stopped.wait_for(|stop| *stop) => {}
            }
        });
    }
    stop.send_replace(true);
}

/// A handler for `/metrics` (rendered by `render` at each scrape) and
/// `/healthz`.
pub fn metrics_handler(render: Arc<dyn Fn() -> String + Send + Sync>) -> Handler {
    Arc::new(move |request: Request<Incoming>| {
        let render = render.clone();
        Box::pin(async move {
            match request.uri().path() {
                "/metrics" => reply(StatusCode::OK, super::CONTENT_TYPE, render()),
                "/healthz" => reply(StatusCode::OK, "text/plain; charset=utf-8", "ok\n".into()),
                _ => not_found(),
            }
        })
    })
}

/// Serves `/metrics` (rendered by `render` at each scrape) and `/healthz`
/// on `listener` in a task of its own, for a process's `--metrics-listen`:
/// the one bootstrap the client and echo binaries share.
pub fn spawn_metrics(
    listener: TcpListener,
    render: impl Fn() -> String + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(serve(
        listener,
        metrics_handler(Arc::new(render)),
        std::future::pending(),
    ))
}
