//! TLS termination on a listener: certificates loaded and checked when the config is compiled,
//! picked per connection by SNI, and the rustls server config built with safe defaults.
//!
//! Neighbours: `config/compile.rs` calls `server_config` for every listener with `tls` (a bad
//! or mismatched file is a `check` error naming it); the result rides in the snapshot, so a
//! reload reads the files again and new connections get the new certificates while existing
//! ones keep theirs. `conn.rs` runs the handshake before the first request.
//!
//! Defaults, with no knobs: TLS 1.3 and 1.2 only, rustls's cipher suites (no CBC, no RSA key
//! exchange), session resumption by stateful cache and by tickets, ALPN `h2` and `http/1.1`
//! (`http2 = false` on the listener leaves `http/1.1` alone).

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert, ServerSessionMemoryCache};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The ALPN protocol id of HTTP/2 over TLS (RFC 9113 §3.2).
pub const ALPN_H2: &[u8] = b"h2";

/// One certificate of a listener, as the file gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    pub cert: String,
    pub key: String,
}

/// Why a listener's TLS could not be set up; the message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path:?}: {error}")]
    Read {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("{path:?} holds no PEM certificate")]
    NoCertificate { path: String },
    #[error("{path:?} holds no PEM private key")]
    NoKey { path: String },
    #[error("bad private key in {path:?}: {error}")]
    BadKey { path: String, error: rustls::Error },
    #[error("the key in {key:?} does not belong to the certificate in {cert:?}")]
    Mismatch { cert: String, key: String },
    #[error("bad certificate in {path:?}: {error}")]
    BadCertificate { path: String, error: String },
    #[error("{0}")]
    Config(rustls::Error),
}

/// A certificate chain with its key, read and checked, and the file it came from.
pub struct LoadedCert {
    key: Arc<CertifiedKey>,
    path: String,
}

impl fmt::Debug for LoadedCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedCert")
            .field("path", &self.path)
            .finish()
    }
}

/// Reads one certificate and its key, and checks that they belong together.
pub fn load(files: &CertFiles) -> Result<LoadedCert, TlsError> {
    let provider = rustls::crypto::ring::default_provider();
    let key = load_key(&files.cert, &files.key, &provider)?;
    // Parse its names now, so that a certificate without usable names is reported here.
    SniResolver::default().add(Arc::clone(&key), &files.cert)?;
    Ok(LoadedCert {
        key,
        path: files.cert.clone(),
    })
}

/// The rustls config for a listener with these certificates. The first is the default, for
/// clients that send no SNI or a name no certificate covers. With `http2`, ALPN offers `h2`
/// before `http/1.1` (RFC 9113 §3.2: the server picks, and we prefer HTTP/2).
pub fn server_config(certs: Vec<LoadedCert>, http2: bool) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut resolver = SniResolver::default();
    for cert in certs {
        resolver.add(cert.key, &cert.path)?;
    }
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    config.session_storage = ServerSessionMemoryCache::new(4096);
    config.ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
    Ok(Arc::new(config))
}

fn load_key(
    cert_path: &str,
    key_path: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let read = |what, path: &str| {
        std::fs::read(Path::new(path)).map_err(|error| TlsError::Read {
            what,
            path: path.to_owned(),
            error,
        })
    };
    let cert_pem = read("certificate", cert_path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: cert_path.to_owned(),
            error: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert_path.to_owned(),
        });
    }
    let key_pem = read("key", key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| TlsError::NoKey {
        path: key_path.to_owned(),
    })?;
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::BadKey {
            path: key_path.to_owned(),
            error,
        })?;
    let certified = CertifiedKey::new(chain, signer);
    // A key that is not the certificate's would fail every handshake; say so now.
    certified.keys_match().map_err(|_| TlsError::Mismatch {
        cert: cert_path.to_owned(),
        key: key_path.to_owned(),
    })?;
    Ok(Arc::new(certified))
}

/// Picks a certificate by the name the client asked for: an exact name first, then a wildcard
/// (`*.example.com` covers `a.example.com`, not `example.com` nor `a.b.example.com`, as
/// RFC 6125 §6.4.3 has it), then the default.
#[derive(Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Keyed by the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("exact", &self.exact.keys().collect::<Vec<_>>())
            .field("wildcard", &self.wildcard.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl SniResolver {
    /// Adds `key` under every DNS name of its certificate; the first certificate added is also
    /// the default. Names already taken by an earlier certificate stay with it.
    fn add(&mut self, key: Arc<CertifiedKey>, path: &str) -> Result<(), TlsError> {
        let Some(end_entity) = key.cert.first() else {
            return Err(TlsError::NoCertificate {
                path: path.to_owned(),
            });
        };
        let parsed =
            webpki::EndEntityCert::try_from(end_entity).map_err(|e| TlsError::BadCertificate {
                path: path.to_owned(),
                error: format!("{e:?}"),
            })?;
        for name in parsed.valid_dns_names() {
            let name = name.to_ascii_lowercase();
            match name.strip_prefix("*.") {
                Some(rest) => {
                    self.wildcard
                        .entry(rest.to_owned())
                        .or_insert_with(|| Arc::clone(&key));
                }
                None => {
                    self.exact.entry(name).or_insert_with(|| Arc::clone(&key));
                }
            }
        }
        if self.default.is_none() {
            self.default = Some(key);
        }
        Ok(())
    }

    fn find(&self, name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let found = name.and_then(|name| {
            let name = name.to_ascii_lowercase();
            self.exact.get(&name).cloned().or_else(|| {
                let (_, parent) = name.split_once('.')?;
                self.wildcard.get(parent).cloned()
            })
        });
        found.or_else(|| self.default.clone())
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(hello.server_name())
    }
}
