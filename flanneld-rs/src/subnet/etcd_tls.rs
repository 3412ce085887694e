//! TLS for the etcd client (`--etcd-cafile/--etcd-certfile/--etcd-keyfile`),
//! with flannel's habits:
//!
//! - A client certificate of X.509 version 1 (what `openssl x509 -req`
//!   makes without extensions) works, as with flannel's Go TLS. rustls
//!   itself never needs to parse our own certificate: only its check that
//!   the key matches the certificate does, and that check (through webpki)
//!   accepts version 3 only ("UnsupportedCertVersion"). So the key provider
//!   the etcd client's rustls uses loads keys as ring does but does not
//!   offer their public key, which skips rustls's check, and
//!   [`check_identity`] makes the same check (the key's public key is the
//!   certificate's SubjectPublicKeyInfo, as Go's `tls.X509KeyPair` checks)
//!   for any certificate version, before the client is built.
//! - The server's certificate is verified exactly as before: rustls's
//!   webpki verifier against `--etcd-cafile` (or the system's roots),
//!   host name included. Nothing here touches it.

use std::sync::Arc;

use rustls::crypto::{CryptoProvider, KeyProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::SigningKey;
use rustls::{SignatureAlgorithm, SignatureScheme};

/// ring's keys, without the public key (see the module documentation).
#[derive(Debug)]
struct AnyVersionKeys;

impl KeyProvider for AnyVersionKeys {
    fn load_private_key(&self, key: PrivateKeyDer<'static>) -> Result<Arc<dyn SigningKey>, rustls::Error> {
        let key = rustls::crypto::ring::default_provider().key_provider.load_private_key(key)?;
        Ok(Arc::new(WithoutPublicKey(key)))
    }
}

/// A signing key that does not tell its public key (the trait's default).
#[derive(Debug)]
struct WithoutPublicKey(Arc<dyn SigningKey>);

impl SigningKey for WithoutPublicKey {
    fn choose_scheme(&self, offered: &[SignatureScheme]) -> Option<Box<dyn rustls::sign::Signer>> {
        self.0.choose_scheme(offered)
    }

    fn algorithm(&self) -> SignatureAlgorithm {
        self.0.algorithm()
    }
}

/// Makes ring, with [`AnyVersionKeys`], the process's rustls provider (the
/// etcd client's TLS connector uses the process default). Call after
/// [`check_identity`] passed; a second call changes nothing.
pub fn use_any_version_client_certs() {
    let provider = CryptoProvider { key_provider: &AnyVersionKeys, ..rustls::crypto::ring::default_provider() };
    // Err: a provider is installed already (ours, from an earlier call).
    let _ = provider.install_default();
}

/// Checks the client identity as Go's `tls.X509KeyPair` does: `cert_pem`
/// holds a certificate, `key_pem` a private key ring can sign with, and the
/// key is the certificate's. The error names the files.
pub fn check_identity(cert_pem: &[u8], certfile: &str, key_pem: &[u8], keyfile: &str) -> Result<(), String> {
    let cert = match CertificateDer::pem_slice_iter(cert_pem).next() {
        Some(Ok(c)) => c,
        Some(Err(e)) => return Err(format!("--etcd-certfile {certfile}: {e}")),
        None => return Err(format!("--etcd-certfile {certfile}: no PEM CERTIFICATE block")),
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| format!("--etcd-keyfile {keyfile}: no usable PEM private key: {e}"))?;
    let key = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("--etcd-keyfile {keyfile}: {e}"))?;
    let spki = subject_public_key_info(&cert)
        .ok_or_else(|| format!("--etcd-certfile {certfile}: not a DER X.509 certificate"))?;
    match key.public_key() {
        Some(k) if k.as_ref() != spki => {
            Err(format!("--etcd-keyfile {keyfile} is not the private key of --etcd-certfile {certfile}"))
        }
        _ => Ok(()),
    }
}

/// One DER element: (tag, the whole element, its contents, what follows).
type Element<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// The first DER element of `input`.
fn der(input: &[u8]) -> Option<Element<'_>> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        (rest[..n].iter().fold(0usize, |a, &b| (a << 8) | usize::from(b)), &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    let header = input.len() - rest.len();
    Some((tag, &input[..header + len], &rest[..len], &rest[len..]))
}

/// The SubjectPublicKeyInfo (the whole SEQUENCE) of a DER certificate of any
/// version: the seventh field of TBSCertificate, the sixth when the
/// version field (`[0]`, absent in version 1) is left out.
fn subject_public_key_info(cert: &[u8]) -> Option<&[u8]> {
    const SEQUENCE: u8 = 0x30;
    const VERSION: u8 = 0xa0;
    let (SEQUENCE, _, certificate, _) = der(cert)? else { return None };
    let (SEQUENCE, _, tbs, _) = der(certificate)? else { return None };
    let mut fields = tbs;
    if der(fields)?.0 == VERSION {
        fields = der(fields)?.3;
    }
    // serialNumber, signature, issuer, validity, subject.
    for _ in 0..5 {
        fields = der(fields)?.3;
    }
    match der(fields)? {
        (SEQUENCE, spki, _, _) => Some(spki),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::{der, subject_public_key_info};

    /// A TLV with a short length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut v = vec![tag];
        if content.len() < 0x80 {
            v.push(content.len() as u8);
        } else {
            v.extend([0x82, (content.len() >> 8) as u8, content.len() as u8]);
        }
        v.extend(content);
        v
    }

    fn cert(with_version: bool) -> (Vec<u8>, Vec<u8>) {
        let spki = tlv(0x30, &[tlv(0x30, &[0x06, 0x01, 0x2a]), tlv(0x03, &[0, 1, 2, 3])].concat());
        let mut tbs = Vec::new();
        if with_version {
            tbs.extend(tlv(0xa0, &tlv(0x02, &[2])));
        }
        tbs.extend(tlv(0x02, &[7])); // serial
        tbs.extend(tlv(0x30, &[5, 0])); // signature algorithm
        tbs.extend(tlv(0x30, &[0u8; 200])); // issuer (long length form)
        tbs.extend(tlv(0x30, &[])); // validity
        tbs.extend(tlv(0x30, &[])); // subject
        tbs.extend(&spki);
        let c = tlv(0x30, &[tlv(0x30, &tbs), tlv(0x30, &[5, 0]), tlv(0x03, &[0])].concat());
        (c, spki)
    }

    #[test]
    fn the_public_key_is_found_in_version_1_and_version_3_certificates() {
        for v3 in [false, true] {
            let (c, spki) = cert(v3);
            assert_eq!(subject_public_key_info(&c), Some(&spki[..]), "version 3: {v3}");
        }
    }

    #[test]
    fn truncated_or_malformed_input_is_refused() {
        let (c, _) = cert(false);
        for n in 0..c.len() {
            assert_eq!(subject_public_key_info(&c[..n]), None, "cut at {n}");
        }
        assert_eq!(der(&[0x30, 0x85, 1, 1, 1, 1, 1]), None);
        assert_eq!(der(&[0x30, 0x80]), None);
    }
}
