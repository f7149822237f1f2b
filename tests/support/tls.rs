//! TLS for the tests: self-signed certificates made with rcgen, and a rustls client that trusts
//! exactly the one it is given.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::within;

/// A self-signed certificate for `localhost`, written as PEM files into `dir`; its DER, for a
/// client to trust.
pub fn certificate(
    dir: &Path,
    name: &str,
) -> (PathBuf, PathBuf, rustls_pki_types::CertificateDer<'static>) {
    let made = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("rcgen");
    let (cert, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    std::fs::write(&cert, made.cert.pem()).expect("writing the certificate");
    std::fs::write(&key, made.signing_key.serialize_pem()).expect("writing the key");
    (cert, key, made.cert.der().clone())
}

/// `GET /` over TLS to `addr` as `localhost`, trusting only `root`: the body, or why not.
pub async fn tls_get(
    addr: SocketAddr,
    root: &rustls_pki_types::CertificateDer<'static>,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone()).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    // The response ends with the connection; a close without close_notify still ends it.
    let _ = within("a TLS response", tls.read_to_end(&mut got)).await;
    let text = String::from_utf8_lossy(&got).into_owned();
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no response: {text:?}"))?;
    if !head.starts_with("HTTP/1.1 200") {
        return Err(format!("not a 200: {head}"));
    }
    Ok(body.to_owned())
}
