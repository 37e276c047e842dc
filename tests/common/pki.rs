//! Throwaway certificates made at run time with rcgen, for the TLS tests
//! and the TLS rows of the benchmarks (which include this file by path).
//! Nothing here is ever committed as a key.

use std::path::Path;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// A CA: its certificate and the issuer that signs with its key.
pub type Ca = CertifiedIssuer<'static, KeyPair>;

/// A throwaway CA named `name`.
pub fn ca(name: &str) -> Ca {
    let mut params = CertificateParams::default();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names`, signed by `ca`, for a server or a client;
/// returns its PEM and its key's PEM.
pub fn issue(ca: &Ca, names: &[&str], usage: ExtendedKeyUsagePurpose) -> (String, String) {
    let key = KeyPair::generate().unwrap();
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    params.distinguished_name.push(DnType::CommonName, names[0]);
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem())
}

/// Writes a fresh PKI into `dir`:
///
/// - `ca.crt`: the CA everyone trusts;
/// - `server.crt`/`.key`: for `127.0.0.1` and `localhost`, signed by it;
/// - `client.crt`/`.key`: a client certificate signed by it;
/// - `wrong-ca.crt`, and `wrong-client.crt`/`.key` signed by that one;
/// - `garbage.crt`: not PEM at all.
pub fn write_files(dir: &Path) {
    let good = ca("switchboard test CA");
    let wrong = ca("some other CA");
    let (server, server_key) = issue(
        &good,
        &["127.0.0.1", "localhost"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let (client, client_key) = issue(&good, &["client.test"], ExtendedKeyUsagePurpose::ClientAuth);
    let (wrong_client, wrong_client_key) = issue(
        &wrong,
        &["client.test"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    for (name, pem) in [
        ("ca.crt", good.pem()),
        ("server.crt", server),
        ("server.key", server_key),
        ("client.crt", client),
        ("client.key", client_key),
        ("wrong-ca.crt", wrong.pem()),
        ("wrong-client.crt", wrong_client),
        ("wrong-client.key", wrong_client_key),
        ("garbage.crt", "this is not PEM\n".into()),
    ] {
        std::fs::write(dir.join(name), pem).unwrap();
    }
}
