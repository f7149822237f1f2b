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
    #[error("cannot verify client certificates with these CAs: {0}")]
    ClientVerifier(String),
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

/// Client certificates on a listener (mTLS): the CAs that sign them, and whether a client
/// without one is turned away.
pub struct ClientAuth {
    pub roots: rustls::RootCertStore,
    pub required: bool,
}

/// The CAs in the PEM file at `path`, for verifying client certificates.
pub fn client_roots(path: &str) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(path)? {
        roots.add(cert).map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            error: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// The rustls config for a listener with these certificates. The first is the default, for
/// clients that send no SNI or a name no certificate covers. With `http2`, ALPN offers `h2`
/// before `http/1.1` (RFC 9113 §3.2: the server picks, and we prefer HTTP/2).
pub fn server_config(
    certs: Vec<LoadedCert>,
    clients: Option<ClientAuth>,
    http2: bool,
) -> Result<Arc<ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut resolver = SniResolver::default();
    for cert in certs {
        resolver.add(cert.key, &cert.path)?;
    }
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(auth.roots),
                provider,
            );
            let verifier = if auth.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| TlsError::ClientVerifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = if http2 {
        vec![ALPN_H2.to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    let (sessions, ticketer) = resumption()?;
    config.session_storage = sessions;
    config.ticketer = ticketer;
    Ok(Arc::new(config))
}

type Resumption = (
    Arc<dyn rustls::server::StoresServerSessions>,
    Arc<dyn rustls::server::ProducesTickets>,
);

/// The session cache and ticket keys, one set for the whole process: a reload builds new
/// server configs, and clients holding a session or ticket from before it should still resume.
fn resumption() -> Result<Resumption, TlsError> {
    static SHARED: std::sync::OnceLock<Resumption> = std::sync::OnceLock::new();
    if let Some(shared) = SHARED.get() {
        return Ok(shared.clone());
    }
    let sessions: Arc<dyn rustls::server::StoresServerSessions> =
        ServerSessionMemoryCache::new(4096);
    let ticketer = rustls::crypto::ring::Ticketer::new().map_err(TlsError::Config)?;
    Ok(SHARED.get_or_init(|| (sessions, ticketer)).clone())
}

fn load_key(
    cert_path: &str,
    key_path: &str,
    provider: &rustls::crypto::CryptoProvider,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = read_certs(cert_path)?;
    let key = read_key(key_path)?;
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

fn read(what: &'static str, path: &str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(Path::new(path)).map_err(|error| TlsError::Read {
        what,
        path: path.to_owned(),
        error,
    })
}

/// Every PEM certificate in the file at `path`, in order; at least one.
pub fn read_certs(path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read("certificate", path)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_owned(),
            error: pem_error(&e),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// The first PEM private key in the file at `path`.
pub fn read_key(path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let pem = read("key", path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|_| TlsError::NoKey {
        path: path.to_owned(),
    })
}

/// A PEM error in words: the library's own text shows markers as byte arrays.
fn pem_error(e: &rustls_pki_types::pem::Error) -> String {
    use rustls_pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM section has no end line ({})",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { line } => {
            format!("bad PEM begin line {:?}", String::from_utf8_lossy(line))
        }
        other => other.to_string(),
    }
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

/// The subject of a client's certificate (DER) as an RFC 4514 string, most specific part first
/// (`CN=alice,O=Example`), as nginx's `$ssl_client_s_dn` gives it. Bytes that could not go in
/// a header as they are (controls, non-ASCII) and the characters RFC 4514 reserves are escaped,
/// so the value is always one safe header line. `None` when the certificate cannot be parsed
/// (rustls verified it, so this does not happen in practice).
pub fn subject(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut out = String::new();
    let rdns: Vec<_> = parsed.subject().iter_rdn().collect();
    for (i, rdn) in rdns.iter().rev().enumerate() {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            match x509_parser::objects::oid2abbrev(attr.attr_type(), registry) {
                Ok(abbrev) => out.push_str(abbrev),
                Err(_) => out.push_str(&attr.attr_type().to_id_string()),
            }
            out.push('=');
            match attr.as_str() {
                Ok(value) => escape_dn_value(&mut out, value),
                // Not a string type: the value's DER in hex, as RFC 4514 §2.4 says.
                Err(_) => {
                    out.push('#');
                    for b in attr.attr_value().data.iter() {
                        out.push_str(&format!("{b:02X}"));
                    }
                }
            }
        }
    }
    Some(out)
}

fn escape_dn_value(out: &mut String, value: &str) {
    let last = value.len().saturating_sub(1);
    for (i, c) in value.char_indices() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && matches!(c, '#' | ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
            out.push(c);
        } else if c.is_ascii_graphic() || c == ' ' {
            out.push(c);
        } else {
            let mut buf = [0u8; 4];
            for b in c.encode_utf8(&mut buf).bytes() {
                out.push_str(&format!("\\{b:02X}"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::escape_dn_value;

    fn escaped(v: &str) -> String {
        let mut out = String::new();
        escape_dn_value(&mut out, v);
        out
    }

    #[test]
    fn dn_values_are_escaped_into_one_safe_header_line() {
        assert_eq!(escaped("alice"), "alice");
        assert_eq!(escaped("Doe, John"), "Doe\\, John");
        assert_eq!(escaped("#1 "), "\\#1\\ ");
        assert_eq!(escaped("a\r\nX-Evil: 1"), "a\\0D\\0AX-Evil: 1");
        assert_eq!(escaped("é"), "\\C3\\A9");
    }
}
