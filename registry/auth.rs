//! Bearer tokens: who may change the registry, and who may read it.
//!
//! With a write token configured, Register, KeepAlive, Drain, Deregister,
//! DrainEndpoint and DeregisterEndpoint need `authorization: Bearer
//! <token>`; with a read token, so do Watch, Resolve, ListServices and
//! ListEndpoints (the write token also reads), and so do xDS (ADS) streams,
//! which only read. Health and reflection stay open. Tokens come from files,
//! never the command line
//! where `ps` shows them, and are compared in constant time.

use std::fmt;
use std::path::Path;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::future::{self, Either};
use http::HeaderValue;
use tonic::Status;

/// The gRPC path prefix of the registry's methods.
const REGISTRY_PATH: &str = "/switchboard.registry.v1.Registry/";

/// Methods that change state and need the write token.
const WRITE_METHODS: [&str; 8] = [
    "Register",
    "KeepAlive",
    "Drain",
    "Deregister",
    "DrainEndpoint",
    "DeregisterEndpoint",
    "SetServiceConfig",
    "DeleteServiceConfig",
];

/// A secret bearer token. Its `Debug` output never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(Arc<str>);

impl Token {
    /// A token from its text; refuses empty text and characters that cannot
    /// travel in an HTTP header.
    pub fn new(text: &str) -> Result<Self, String> {
        let text = text.trim();
        if text.is_empty() {
            return Err("the token is empty".into());
        }
        if !text.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces".into());
        }
        Ok(Self(text.into()))
    }

    /// Reads a token from the first line of `path`.
    pub fn from_file(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read token file {}: {e}", path.display()))?;
        Self::new(text.lines().next().unwrap_or(""))
            .map_err(|e| format!("token file {}: {e}", path.display()))
    }

    /// The `authorization` header value that presents this token.
    pub fn header(&self) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {}", self.0)).expect("checked to be printable ASCII")
    }

    /// Whether `presented` is this token, in time independent of where they
    /// differ.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = self.0.as_bytes();
        expected.len() == presented.len()
            && expected
                .iter()
                .zip(presented)
                .fold(0u8, |diff, (a, b)| diff | (a ^ b))
                == 0
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// The tokens a registry demands; `None` leaves that access open.
#[derive(Debug, Clone, Default)]
pub struct AccessTokens {
    /// Needed to register, heartbeat, drain and deregister.
    pub write: Option<Token>,
    /// Needed to watch, resolve and list (the write token also works).
    pub read: Option<Token>,
}

/// The path prefix of xDS ADS calls: reads, guarded by the read token like
/// Watch.
pub const ADS_PATH: &str = "/envoy.service.discovery.v3.AggregatedDiscoveryService/";

impl AccessTokens {
    /// Checks the request for `path` against the tokens.
    fn check(&self, path: &str, headers: &http::HeaderMap) -> Result<(), Status> {
        let (method, write) = if let Some(method) = path.strip_prefix(REGISTRY_PATH) {
            (method, WRITE_METHODS.contains(&method))
        } else if let Some(method) = path.strip_prefix(ADS_PATH) {
            (method, false)
        } else {
            return Ok(());
        };
        let accepted: Vec<&Token> = if write {
            self.write.iter().collect()
        } else {
            self.read
                .iter()
                .chain(self.write.iter().filter(|_| self.read.is_some()))
                .collect()
        };
        if accepted.is_empty() {
            return Ok(());
        }
        let kind = if write { "write" } else { "read" };
        let presented = headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(format!(
                    "{method} needs the registry's {kind} token: send `authorization: Bearer <token>` (--token-file)"
                ))
            })?;
        if accepted.iter().any(|token| token.matches(presented)) {
            Ok(())
        } else {
            Err(Status::unauthenticated(format!(
                "{method}: wrong {kind} token"
            )))
        }
    }
}

/// A tower layer that refuses registry calls without the right token.
#[derive(Debug, Clone)]
pub struct RequireTokensLayer(Arc<AccessTokens>);

impl RequireTokensLayer {
    /// Demands `tokens`.
    pub fn new(tokens: AccessTokens) -> Self {
        Self(Arc::new(tokens))
    }
}

impl<S> tower::Layer<S> for RequireTokensLayer {
    type Service = RequireTokens<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RequireTokens {
            inner,
            tokens: self.0.clone(),
        }
    }
}

/// The service [`RequireTokensLayer`] wraps around the server's routes.
#[derive(Debug, Clone)]
pub struct RequireTokens<S> {
    inner: S,
    tokens: Arc<AccessTokens>,
}

impl<S, B> tower::Service<http::Request<B>> for RequireTokens<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Either<S::Future, future::Ready<Result<S::Response, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        match self.tokens.check(request.uri().path(), request.headers()) {
            Ok(()) => Either::Left(self.inner.call(request)),
            Err(status) => Either::Right(future::ready(Ok(status.into_http()))),
        }
    }
}

/// A client-side interceptor presenting a token, if there is one, on every
/// call to the registry.
#[derive(Debug, Clone, Default)]
pub struct Bearer(pub Option<Token>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(token) = &self.0 {
            request.metadata_mut().insert(
                "authorization",
                token
                    .header()
                    .to_str()
                    .expect("ascii")
                    .parse()
                    .expect("valid"),
            );
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(token: Option<&str>) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        if let Some(token) = token {
            headers.insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        headers
    }

    #[test]
    fn write_and_read_tokens_guard_their_methods() {
        let tokens = AccessTokens {
            write: Some(Token::new("w").unwrap()),
            read: Some(Token::new("r").unwrap()),
        };
        let register = "/switchboard.registry.v1.Registry/Register";
        let watch = "/switchboard.registry.v1.Registry/Watch";
        assert!(tokens.check(register, &headers(None)).is_err());
        assert!(tokens.check(register, &headers(Some("r"))).is_err());
        assert!(tokens.check(register, &headers(Some("w"))).is_ok());
        assert!(tokens.check(watch, &headers(None)).is_err());
        assert!(tokens.check(watch, &headers(Some("r"))).is_ok());
        assert!(tokens.check(watch, &headers(Some("w"))).is_ok());
        assert!(tokens
            .check("/grpc.health.v1.Health/Check", &headers(None))
            .is_ok());
        let ads =
            "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources";
        assert!(tokens.check(ads, &headers(None)).is_err());
        assert!(tokens.check(ads, &headers(Some("r"))).is_ok());
        assert!(tokens.check(ads, &headers(Some("w"))).is_ok());
    }

    #[test]
    fn without_a_read_token_reads_are_open() {
        let tokens = AccessTokens {
            write: Some(Token::new("w").unwrap()),
            read: None,
        };
        assert!(tokens
            .check("/switchboard.registry.v1.Registry/Resolve", &headers(None))
            .is_ok());
    }

    #[test]
    fn tokens_refuse_bad_text_and_hide_in_debug() {
        assert!(Token::new("  ").is_err());
        assert!(Token::new("a b").is_err());
        assert_eq!(
            format!("{:?}", Token::new("secret").unwrap()),
            "Token(<redacted>)"
        );
    }
}
