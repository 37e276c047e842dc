//! The flags several subcommands share, each set declared once: server
//! TLS, client TLS (to backends or to the registry), and where to serve
//! metrics.

use std::path::{Path, PathBuf};

use switchboard::tls::{ClientTls, ServerTls};

/// The `--tls-cert`, `--tls-key` and `--tls-client-ca` flags of every
/// server binary.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServerTlsFlags {
    /// PEM certificate chain to serve TLS with (the server's certificate
    /// first); needs --tls-key. Without it the server speaks plaintext.
    #[arg(long, value_name = "PATH")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, value_name = "PATH")]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate that clients' certificates must be signed by
    /// (mutual TLS: clients without one are refused); needs --tls-cert.
    #[arg(long, value_name = "PATH")]
    pub tls_client_ca: Option<PathBuf>,
}

impl ServerTlsFlags {
    /// The settings the flags name, `None` for plaintext, or a one-line
    /// error.
    pub fn load(&self) -> Result<Option<ServerTls>, String> {
        match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (None, None, None) => Ok(None),
            (Some(cert), Some(key), client_ca) => {
                ServerTls::from_files(cert, key, client_ca.as_deref())
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
            (Some(_), None, _) => {
                Err("--tls-cert needs --tls-key (the certificate's private key)".into())
            }
            (None, Some(_), _) => {
                Err("--tls-key needs --tls-cert (the certificate it belongs to)".into())
            }
            (None, None, Some(_)) => Err(
                "--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS".into(),
            ),
        }
    }
}

/// Client TLS settings from command-line flags named `[ca, cert, key]`:
/// `None` when none is given, or a one-line error naming the missing flag.
pub fn client_tls(
    names: [&str; 3],
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<ClientTls>, String> {
    let [ca_flag, cert_flag, key_flag] = names;
    let identity = match (cert, key) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => {
            return Err(format!(
                "{cert_flag} needs {key_flag} (the client certificate's private key)"
            ))
        }
        (None, Some(_)) => {
            return Err(format!(
                "{key_flag} needs {cert_flag} (the client certificate it belongs to)"
            ))
        }
    };
    match ca {
        Some(ca) => ClientTls::from_files(ca, identity)
            .map(Some)
            .map_err(|e| e.to_string()),
        None if identity.is_some() => Err(format!(
            "{cert_flag} needs {ca_flag} (the CA that signed the server's certificate)"
        )),
        None => Ok(None),
    }
}

/// `--ca`, `--cert`, `--key` and `--tls-server-name`: TLS to the servers a
/// command calls (backends and the registry).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClientTlsFlags {
    /// PEM CA certificate to verify servers' TLS certificates with; turns on
    /// TLS. Without it, plaintext.
    #[arg(long, value_name = "PATH")]
    pub ca: Option<PathBuf>,
    /// PEM client certificate to present to servers that demand mutual
    /// TLS; needs --key and --ca.
    #[arg(long, value_name = "PATH")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, value_name = "PATH")]
    pub key: Option<PathBuf>,
    /// Verify every server certificate against this DNS name or IP address
    /// instead of the host dialled; needs --ca.
    #[arg(long, value_name = "NAME")]
    pub tls_server_name: Option<String>,
}

impl ClientTlsFlags {
    /// The settings the flags name, `None` for plaintext, or a one-line
    /// error naming the flag at fault.
    pub fn load(&self) -> Result<Option<ClientTls>, String> {
        let tls = client_tls(
            ["--ca", "--cert", "--key"],
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )?;
        match (tls, &self.tls_server_name) {
            (Some(tls), Some(name)) => tls
                .with_server_name(name)
                .map(Some)
                .map_err(|e| format!("--tls-server-name: {e}")),
            (None, Some(_)) => Err("--tls-server-name needs --ca: it only applies to TLS".into()),
            (tls, None) => Ok(tls),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_come_in_pairs() {
        let path = Path::new("/nonexistent");
        let names = ["--ca", "--cert", "--key"];
        assert!(client_tls(names, None, None, None).unwrap().is_none());
        for (ca, cert, key, expected) in [
            (None, Some(path), None, "--cert needs --key"),
            (None, None, Some(path), "--key needs --cert"),
            (None, Some(path), Some(path), "--cert needs --ca"),
            (Some(path), None, None, "cannot read the CA file"),
        ] {
            let error = client_tls(names, ca, cert, key).unwrap_err();
            assert!(error.contains(expected), "{error}");
        }
        let flags = ServerTlsFlags {
            tls_client_ca: Some(path.into()),
            ..ServerTlsFlags::default()
        };
        assert!(flags.load().unwrap_err().contains("needs --tls-cert"));
    }
}
