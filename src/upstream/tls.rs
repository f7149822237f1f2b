//! TLS to upstream servers: certificates verified by default (the system's roots, or the CA
//! the config names), SNI sent, and a client certificate presented when asked for (mTLS).
//!
//! Neighbours: `config/compile/upstream.rs` calls `build` for an upstream with `tls`, so that
//! `check` names a missing or bad file; `upstream::connect` runs `handshake` on every new
//! connection, under the same connect timeout as the TCP connect itself.
//!
//! The name a server's certificate must hold (and the SNI sent) is, in order: the upstream's
//! `tls.server_name`; the server's own host name when it was given by name; its IP address.

use std::fmt;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::tls::{read_certs, read_key, TlsError};

/// An upstream's `tls` table, file names already resolved.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub verify: bool,
    pub ca: Option<String>,
    pub server_name: Option<String>,
    pub client_cert: Option<String>,
    pub client_key: Option<String>,
}

/// Why an upstream's TLS settings cannot be used, beyond a bad file.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The CA file (`ca`).
    #[error(transparent)]
    Ca(TlsError),
    /// The client certificate file (`client_cert`).
    #[error(transparent)]
    ClientCertFile(TlsError),
    /// The client key file (`client_key`).
    #[error(transparent)]
    ClientKeyFile(TlsError),
    #[error("{0}")]
    Config(rustls::Error),
    #[error("{0:?} is not a valid server name")]
    BadServerName(String),
    #[error("bad CA certificate in {path:?}: {error}")]
    BadCa { path: String, error: rustls::Error },
    #[error(
        "no trusted CA certificates found on this system ({0}); name a CA file with tls.ca, or set tls.verify = false"
    )]
    NoSystemRoots(String),
    #[error("the client certificate in {cert:?} cannot be used with the key in {key:?}: {error}")]
    ClientCert {
        cert: String,
        key: String,
        error: rustls::Error,
    },
}

/// An upstream's TLS client, ready for handshakes.
pub struct UpstreamTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Reads every file the settings name and builds the TLS client. TLS 1.3 and 1.2 only, ALPN
/// `alpn` (what the upstream's `protocol` speaks), sessions resumed where the server allows.
pub fn build(files: &TlsFiles, alpn: &[&[u8]]) -> Result<UpstreamTls, SetupError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server_name = files
        .server_name
        .as_ref()
        .map(|name| {
            ServerName::try_from(name.clone()).map_err(|_| SetupError::BadServerName(name.clone()))
        })
        .transpose()?;
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(SetupError::Config)?;
    let builder = if files.verify {
        builder.with_root_certificates(roots(files.ca.as_deref())?)
    } else {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(NoVerify { provider }))
    };
    let mut config = match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => builder
            .with_client_auth_cert(
                read_certs(cert).map_err(SetupError::ClientCertFile)?,
                read_key(key).map_err(SetupError::ClientKeyFile)?,
            )
            .map_err(|error| SetupError::ClientCert {
                cert: cert.clone(),
                key: key.clone(),
                error,
            })?,
        // The config compiler reports one without the other.
        _ => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(UpstreamTls {
        config: Arc::new(config),
        server_name,
    })
}

/// The CA file's certificates, or the system's trusted roots.
fn roots(ca: Option<&str>) -> Result<RootCertStore, SetupError> {
    let mut roots = RootCertStore::empty();
    match ca {
        Some(path) => {
            for cert in read_certs(path).map_err(SetupError::Ca)? {
                roots.add(cert).map_err(|error| SetupError::BadCa {
                    path: path.to_owned(),
                    error,
                })?;
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            // Unparseable entries in a system store are skipped, as every TLS client does.
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                let why = found
                    .errors
                    .first()
                    .map_or_else(|| "the store is empty".to_owned(), |e| e.to_string());
                return Err(SetupError::NoSystemRoots(why));
            }
        }
    }
    Ok(roots)
}

impl UpstreamTls {
    /// The rustls client config.
    pub fn client_config(&self) -> &Arc<ClientConfig> {
        &self.config
    }

    /// Runs the handshake over a connected socket. `host` is the server's own name when it was
    /// configured by name; the IP address stands in otherwise.
    pub async fn handshake(
        &self,
        tcp: TcpStream,
        host: Option<&str>,
        ip: std::net::IpAddr,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let name = match (&self.server_name, host) {
            (Some(name), _) => name.clone(),
            (None, Some(host)) => ServerName::try_from(host.to_owned())
                .unwrap_or_else(|_| ServerName::IpAddress(ip.into())),
            (None, None) => ServerName::IpAddress(ip.into()),
        };
        tokio_rustls::TlsConnector::from(Arc::clone(&self.config))
            .connect(name, tcp)
            .await
    }
}

/// `verify = false`: any certificate is accepted, though the handshake's signatures are still
/// checked (so the connection is at least with whoever holds the key it presented).
#[derive(Debug)]
struct NoVerify {
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
