//! Certificates made at test time (rcgen): a CA, and leaf certificates it signs for the names a
//! test asks for, written as PEM files that a Gatehouse config can name.

use std::path::PathBuf;
use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    der: CertificateDer<'static>,
    pem: String,
    dir: tempfile::TempDir,
}

/// A leaf certificate on disk.
pub struct Leaf {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub der: CertificateDer<'static>,
}

impl TestCa {
    pub fn new() -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Gatehouse test CA");
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("CA certificate");
        let der = cert.der().clone();
        TestCa {
            issuer: Issuer::new(params, key),
            der,
            pem: cert.pem(),
            dir: tempfile::tempdir().expect("cert dir"),
        }
    }

    /// A certificate for `names`, written as `<file>.crt` and `<file>.key`.
    pub fn leaf(&self, file: &str, names: &[&str]) -> Leaf {
        let names: Vec<String> = names.iter().map(|n| (*n).to_owned()).collect();
        let params = CertificateParams::new(names).expect("leaf params");
        self.write_leaf(file, params)
    }

    /// The CA's own certificate as PEM, for a config's `ca` file.
    pub fn pem(&self) -> &str {
        &self.pem
    }

    /// The CA's certificate written to `ca.pem` in the directory, for a config's `ca`.
    pub fn pem_file(&self) -> PathBuf {
        let path = self.path("ca.pem");
        std::fs::write(&path, &self.pem).expect("writing the CA file");
        path
    }

    /// The CA's own certificate, for a root store.
    pub fn der(&self) -> CertificateDer<'static> {
        self.der.clone()
    }

    /// A client certificate whose subject is `O=Gatehouse Tests, CN=<cn>`.
    pub fn client_leaf(&self, file: &str, cn: &str) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Gatehouse Tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        self.write_leaf(file, params)
    }

    fn write_leaf(&self, file: &str, params: CertificateParams) -> Leaf {
        let key = KeyPair::generate().expect("leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("leaf certificate");
        let cert_path = self.dir.path().join(format!("{file}.crt"));
        let key_path = self.dir.path().join(format!("{file}.key"));
        std::fs::write(&cert_path, cert.pem()).expect("writing cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("writing key");
        Leaf {
            cert: cert_path,
            key: key_path,
            der: cert.der().clone(),
        }
    }

    /// A rustls client that trusts this CA and presents `cert` when asked.
    pub fn client_with_cert(&self, cert: &Leaf) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA into the root store");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let key = std::fs::read(&cert.key).expect("client key");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).expect("client key PEM");
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_client_auth_cert(vec![cert.der.clone()], key)
            .expect("client certificate");
        Arc::new(config)
    }

    /// A file in the same directory, for tests that need a broken one.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// A rustls client that trusts this CA only, offering `alpn`.
    pub fn client(&self, alpn: &[&[u8]]) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).expect("CA into the root store");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(config)
    }
}

impl TestCa {
    /// A rustls server presenting `leaf`; with `clients`, it requires a client certificate
    /// signed by that CA.
    pub fn server(&self, leaf: &Leaf, clients: Option<&TestCa>) -> Arc<rustls::ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("protocol versions");
        let builder = match clients {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                roots.add(ca.der()).expect("client CA");
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .expect("client verifier");
                builder.with_client_cert_verifier(verifier)
            }
        };
        let key = std::fs::read(&leaf.key).expect("leaf key");
        let key = rustls_pki_types::PrivateKeyDer::from_pem_slice(&key).expect("leaf key PEM");
        let config = builder
            .with_single_cert(vec![leaf.der.clone()], key)
            .expect("server certificate");
        Arc::new(config)
    }
}

impl Leaf {
    /// `tls = { cert = "...", key = "..." }` for this certificate.
    pub fn toml(&self) -> String {
        format!(
            "{{ cert = \"{}\", key = \"{}\" }}",
            self.cert.display(),
            self.key.display()
        )
    }
}
