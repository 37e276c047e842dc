//! TLS and mutual TLS for every switchboard connection, in one place: the
//! registry and echo servers ([`ServerTls`], through tonic's TLS), and
//! everything that dials them ([`ClientTls`]: the client library's
//! subchannels, its registry resolver and the echo servers' lease keepers,
//! all through [`crate::client::transport`]).
//!
//! Certificates and keys come from PEM files. Everything is checked when the
//! files are loaded, so a wrong file stops a binary at startup with one line
//! naming it, rather than failing every handshake later. rustls runs on the
//! `ring` provider, chosen explicitly rather than through a process-wide
//! default (tonic's server side is the exception; see
//! [`ServerTls::tonic_config`]).
//!
//! Without a server-name override a client verifies the server's certificate
//! against the host it dials, so a backend registered as `127.0.0.1:50051`
//! needs `127.0.0.1` among its certificate's subject alternative names.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, crypto::CryptoProvider, RootCertStore};
use tokio_rustls::TlsConnector;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

/// How long a server gives a client to finish its TLS handshake, so that
/// half-open handshakes do not pile up.
pub const SERVER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The ALPN protocol id of HTTP/2, which gRPC over TLS must negotiate.
const ALPN_H2: &[u8] = b"h2";

/// Why TLS settings could not be loaded. Each message is one line naming the
/// file and what to do about it, because the binaries print it as is.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file could not be read.
    #[error("cannot read the {what} file {}: {error}; check the path and its permissions", .path.display())]
    Read {
        /// What the file should hold, e.g. `server certificate`.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("the {what} file {} is not valid PEM ({error}); give a PEM file as written by openssl", .path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What the PEM parser said.
        error: pem::Error,
    },
    /// The file holds no certificate.
    #[error("the {what} file {} holds no certificate; expected PEM blocks starting with -----BEGIN CERTIFICATE-----", .path.display())]
    NoCertificate {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// The file holds no private key.
    #[error("the {what} file {} holds no private key; expected a PEM PKCS#8, PKCS#1 or SEC1 key (-----BEGIN PRIVATE KEY-----)", .path.display())]
    NoKey {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A certificate could not be used, e.g. as a trust anchor.
    #[error("the {what} file {} holds a certificate that cannot be used: {error}", .path.display())]
    BadCertificate {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What rustls said.
        error: rustls::Error,
    },
    /// The key does not belong to the certificate, or cannot sign.
    #[error("the key {} does not fit the certificate {}: {error}; give the key the certificate was issued for", .key.display(), .cert.display())]
    KeyMismatch {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        error: rustls::Error,
    },
    /// The server-name override is neither a DNS name nor an IP address.
    #[error("invalid TLS server name {name:?}: use a DNS name or an IP address")]
    ServerName {
        /// The name given.
        name: String,
    },
    /// rustls refused the combination of settings.
    #[error("cannot set up TLS: {0}")]
    Setup(rustls::Error),
}

/// The `ring` provider every rustls config here is built with, so no
/// process-wide default is needed.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A PEM file's bytes, read for `what`.
fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// Every certificate in a PEM file; at least one.
fn certificates(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| TlsError::Pem {
            what,
            path: path.to_owned(),
            error,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

/// The private key in a PEM file.
fn private_key(
    what: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|error| match error {
        pem::Error::NoItemsFound => TlsError::NoKey {
            what,
            path: path.to_owned(),
        },
        error => TlsError::Pem {
            what,
            path: path.to_owned(),
            error,
        },
    })
}

/// The trust anchors in a CA file.
fn roots(what: &'static str, path: &Path, pem: &[u8]) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in certificates(what, path, pem)? {
        roots.add(cert).map_err(|error| TlsError::BadCertificate {
            what,
            path: path.to_owned(),
            error,
        })?;
    }
    Ok(roots)
}

/// A certificate chain and its key, read and parsed; whether they belong
/// together is checked when a rustls config is built from them.
struct CertAndKey {
    /// The chain's PEM, for tonic.
    cert_pem: Vec<u8>,
    /// The key's PEM, for tonic.
    key_pem: Vec<u8>,
    /// The parsed chain.
    certs: Vec<CertificateDer<'static>>,
    /// The parsed key.
    key: PrivateKeyDer<'static>,
}

impl CertAndKey {
    /// Reads the chain at `cert` and the key at `key`, called `cert_what`
    /// and `key_what` in errors.
    fn load(
        (cert_what, cert): (&'static str, &Path),
        (key_what, key): (&'static str, &Path),
    ) -> Result<Self, TlsError> {
        let cert_pem = read(cert_what, cert)?;
        let key_pem = read(key_what, key)?;
        Ok(Self {
            certs: certificates(cert_what, cert, &cert_pem)?,
            key: private_key(key_what, key, &key_pem)?,
            cert_pem,
            key_pem,
        })
    }

    /// The chain and key as tonic takes them.
    fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// A server's TLS settings: its certificate chain and key, and optionally
/// the CA that client certificates must be signed by (mutual TLS: clients
/// without such a certificate are refused during the handshake).
#[derive(Clone)]
pub struct ServerTls {
    /// The chain and key, as tonic takes them.
    identity: Identity,
    /// The CA client certificates must chain to; `None` asks for none.
    client_ca: Option<Certificate>,
    /// Where the chain came from, for logs.
    cert_path: PathBuf,
}

impl fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ServerTls")
            .field("cert", &self.cert_path)
            .field("mutual", &self.requires_client_certificate())
            .finish_non_exhaustive()
    }
}

impl ServerTls {
    /// Loads the PEM chain at `cert` (the server's own certificate first),
    /// its key at `key` and, for mutual TLS, the CA at `client_ca` that
    /// client certificates must be signed by. Checks that the key fits the
    /// certificate.
    pub fn from_files(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, TlsError> {
        let pair = CertAndKey::load(("server certificate", cert), ("server key", key))?;
        let builder = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?;
        let (builder, client_ca) = match client_ca {
            Some(path) => {
                let pem = read("client CA", path)?;
                let roots = roots("client CA", path, &pem)?;
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    roots.into(),
                    provider(),
                )
                .build()
                .map_err(|error| TlsError::BadCertificate {
                    what: "client CA",
                    path: path.to_owned(),
                    error: rustls::Error::General(error.to_string()),
                })?;
                (
                    builder.with_client_cert_verifier(verifier),
                    Some(Certificate::from_pem(pem)),
                )
            }
            None => (builder.with_no_client_auth(), None),
        };
        // Built only to check the pair; tonic builds its own from the PEM.
        builder
            .with_single_cert(pair.certs.clone(), pair.key.clone_key())
            .map_err(|error| TlsError::KeyMismatch {
                cert: cert.to_owned(),
                key: key.to_owned(),
                error,
            })?;
        Ok(Self {
            identity: pair.identity(),
            client_ca,
            cert_path: cert.to_owned(),
        })
    }

    /// Whether clients must present a certificate (mutual TLS).
    pub fn requires_client_certificate(&self) -> bool {
        self.client_ca.is_some()
    }

    /// The settings for tonic's `Server::tls_config`.
    pub fn tonic_config(&self) -> ServerTlsConfig {
        // tonic's acceptor builds its rustls config on the process-wide
        // provider. Install ring unless the application chose one, so rustls
        // never has to guess (and panic) from crate features.
        if CryptoProvider::get_default().is_none() {
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let config = ServerTlsConfig::new()
            .identity(self.identity.clone())
            .timeout(SERVER_HANDSHAKE_TIMEOUT);
        match &self.client_ca {
            Some(ca) => config.client_ca_root(ca.clone()),
            None => config,
        }
    }
}

/// A client's TLS settings: the CA to trust servers by, optionally a client
/// certificate and key (for servers that demand mutual TLS), and optionally
/// the name to verify server certificates against instead of the host
/// dialled.
#[derive(Clone)]
pub struct ClientTls {
    /// Whether a client certificate is presented.
    presents_certificate: bool,
    /// Verify certificates against this name instead of the host dialled.
    server_name: Option<ServerName<'static>>,
    /// The rustls config, offering HTTP/2 by ALPN.
    config: Arc<rustls::ClientConfig>,
    /// Where the CA came from, for logs.
    ca_path: PathBuf,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls")
            .field("ca", &self.ca_path)
            .field("client_certificate", &self.presents_certificate)
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts the CA certificates in the PEM file `ca` and, given
    /// `identity` (certificate chain file, key file), presents that client
    /// certificate to servers that ask for one.
    pub fn from_files(ca: &Path, identity: Option<(&Path, &Path)>) -> Result<Self, TlsError> {
        let ca_pem = read("CA", ca)?;
        let roots = roots("CA", ca, &ca_pem)?;
        let builder = rustls::ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(TlsError::Setup)?
            .with_root_certificates(roots);
        let mut config = match identity {
            Some((cert, key)) => {
                let pair = CertAndKey::load(("client certificate", cert), ("client key", key))?;
                builder
                    .with_client_auth_cert(pair.certs, pair.key)
                    .map_err(|error| TlsError::KeyMismatch {
                        cert: cert.to_owned(),
                        key: key.to_owned(),
                        error,
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Self {
            presents_certificate: identity.is_some(),
            server_name: None,
            config: Arc::new(config),
            ca_path: ca.to_owned(),
        })
    }

    /// Verifies every server certificate against `name` (a DNS name or an
    /// IP address) instead of the host dialled; for servers reached at
    /// addresses their certificates do not name.
    pub fn with_server_name(mut self, name: &str) -> Result<Self, TlsError> {
        let parsed = ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName {
            name: name.to_owned(),
        })?;
        self.server_name = Some(parsed);
        Ok(self)
    }

    /// Whether a client certificate is presented.
    pub fn presents_certificate(&self) -> bool {
        self.presents_certificate
    }

    /// The name a certificate must carry for `address` (`host:port`): the
    /// override if one is set, the host otherwise.
    pub fn server_name_for(&self, address: &str) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let authority: http::uri::Authority = address
            .parse()
            .map_err(|e| format!("invalid address {address:?}: {e}"))?;
        let host = authority.host();
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        ServerName::try_from(host.to_owned()).map_err(|_| {
            format!("{host:?} cannot be checked against a TLS certificate; set a server name")
        })
    }

    /// Runs the TLS handshake with the server at `address` over `io` and
    /// checks that it agreed to HTTP/2. Errors are one line, naming the
    /// address and the certificate problem if there is one.
    pub async fn handshake<IO>(&self, address: &str, io: IO) -> Result<TlsStream<IO>, String>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.server_name_for(address)?;
        let stream = TlsConnector::from(self.config.clone())
            .connect(name.clone(), io)
            .await
            .map_err(|e| {
                let hint = match e
                    .get_ref()
                    .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                {
                    Some(rustls::Error::InvalidCertificate(_)) => format!(
                        "; check that {} holds the CA that signed its certificate and that the certificate names {}",
                        self.ca_path.display(),
                        name.to_str()
                    ),
                    Some(rustls::Error::InvalidMessage(_)) => {
                        "; does the server serve TLS?".to_owned()
                    }
                    _ => String::new(),
                };
                format!("TLS handshake with {address} failed: {e}{hint}")
            })?;
        if stream.get_ref().1.alpn_protocol() != Some(ALPN_H2) {
            return Err(format!(
                "{address} did not agree to HTTP/2 over TLS (ALPN h2); is it a gRPC server?"
            ));
        }
        Ok(stream)
    }
}

/// The URI scheme for connections with or without TLS.
pub fn scheme(tls: bool) -> Scheme {
    if tls {
        Scheme::HTTPS
    } else {
        Scheme::HTTP
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test's files.
    fn dir(name: &str) -> TempDir {
        let dir =
            std::env::temp_dir().join(format!("switchboard-tls-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A directory removed when the test ends.
    struct TempDir(PathBuf);

    impl std::ops::Deref for TempDir {
        type Target = Path;

        fn deref(&self) -> &Path {
            &self.0
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A self-signed certificate for `127.0.0.1`, and its key, written to
    /// `dir` under `name`.
    fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, certified.cert.pem()).unwrap();
        std::fs::write(&key, certified.signing_key.serialize_pem()).unwrap();
        (cert, key)
    }

    #[test]
    fn loads_matching_files_and_names_the_wrong_ones() {
        let dir = dir("load");
        let (cert, key) = self_signed(&dir, "a");
        let (_, other_key) = self_signed(&dir, "b");
        let server = ServerTls::from_files(&cert, &key, Some(&cert)).unwrap();
        assert!(server.requires_client_certificate());
        let client = ClientTls::from_files(&cert, Some((&cert, &key))).unwrap();
        assert!(client.presents_certificate());

        let missing = dir.join("missing.pem");
        let garbage = dir.join("garbage.pem");
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let errors = [
            ServerTls::from_files(&missing, &key, None).unwrap_err(),
            ServerTls::from_files(&garbage, &key, None).unwrap_err(),
            ServerTls::from_files(&key, &key, None).unwrap_err(),
            ServerTls::from_files(&cert, &cert, None).unwrap_err(),
            ServerTls::from_files(&cert, &other_key, None).unwrap_err(),
            ClientTls::from_files(&garbage, None).unwrap_err(),
        ];
        let expected = [
            "cannot read the server certificate file",
            "holds no certificate",
            "holds no certificate",
            "holds no private key",
            "does not fit the certificate",
            "holds no certificate",
        ];
        for (error, expected) in errors.iter().zip(expected) {
            let text = error.to_string();
            assert!(text.contains(expected), "{text}");
            assert!(!text.contains('\n'), "{text}");
        }
    }

    #[test]
    fn server_names_default_to_the_host_dialled() {
        let dir = dir("names");
        let (cert, _) = self_signed(&dir, "a");
        let tls = ClientTls::from_files(&cert, None).unwrap();
        assert_eq!(
            tls.server_name_for("127.0.0.1:50051").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            tls.server_name_for("[::1]:50051").unwrap(),
            ServerName::try_from("::1").unwrap()
        );
        let tls = tls.with_server_name("echo.internal").unwrap();
        assert_eq!(
            tls.server_name_for("127.0.0.1:50051").unwrap(),
            ServerName::try_from("echo.internal").unwrap()
        );
        assert!(tls.with_server_name("not a name").is_err());
    }
}
