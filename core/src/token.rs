//! HS256 JSON Web Tokens: the signed tenant context an API gateway can mint.
//!
//! Only `alg: HS256` is accepted (`none`, RS*, ES*, anything else is refused before the
//! signature is looked at), `exp` is required, `nbf` is honoured, and the signature is compared
//! in constant time. Nothing about a rejected token is echoed back.
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::{Map, Value};
use sha2::Sha256;

/// Longest token accepted; longer input is refused before any decoding.
pub const MAX_TOKEN_LEN: usize = 8192;
/// Shortest secret accepted (256 bits, as RFC 7518 asks for HS256).
pub const MIN_SECRET_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("token is malformed")]
    Malformed,
    #[error("token algorithm is not HS256")]
    Algorithm,
    #[error("token signature does not verify")]
    Signature,
    #[error("token has no numeric exp claim")]
    MissingExp,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet")]
    NotYetValid,
    #[error("token has no usable tenant claim")]
    MissingTenant,
}

/// What a verified token says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub tenant: String,
    pub exp: i64,
}

/// Cheap structural test: three base64url segments whose first decodes to a JSON object.
/// Tenant ids may contain dots, so a dot alone does not make a token.
pub fn looks_like_token(raw: &str) -> bool {
    // (most values are plain tenant ids: two dots at most, rarely exactly two)
    if raw.bytes().filter(|&b| b == b'.').count() != 2 {
        return false;
    }
    let mut parts = raw.split('.');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(_), Some(_), None) => decode_object(h).is_ok(),
        _ => false,
    }
}

/// The tenant a token claims, read without verifying it: only for the audit log of a refused
/// token (where the claim is labelled as unverified), never for a decision.
pub fn unverified_tenant(raw: &str, claim: &str) -> Option<String> {
    let payload = raw.split('.').nth(1)?;
    let claims = decode_object(payload).ok()?;
    claims.get(claim)?.as_str().map(str::to_string)
}

fn decode_object(segment: &str) -> Result<Map<String, Value>, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// A token's header: only what is checked.
#[derive(Deserialize)]
struct Header {
    alg: Option<Value>,
    typ: Option<Value>,
    crit: Option<Value>,
}

/// A token's claims: `exp`, `nbf`, and the rest, where the tenant claim (its name is a setting)
/// is looked up.
#[derive(Deserialize)]
struct Payload {
    exp: Option<Value>,
    nbf: Option<Value>,
    #[serde(flatten)]
    claims: Map<String, Value>,
}

/// A base64url segment holding a JSON object of type `T`.
fn decode<T: for<'de> Deserialize<'de>>(segment: &str) -> Result<T, TokenError> {
    let bytes = URL_SAFE_NO_PAD.decode(segment).map_err(|_| TokenError::Malformed)?;
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(v @ Value::Object(_)) => serde_json::from_value(v).map_err(|_| TokenError::Malformed),
        _ => Err(TokenError::Malformed),
    }
}

fn numeric(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f.floor() as i64)),
        _ => None,
    }
}

/// Verify `token` with `secret`; `claim` names the tenant claim, `now` is Unix seconds.
pub fn verify(
    token: &str,
    secret: &[u8],
    claim: &str,
    now: i64,
    leeway: i64,
) -> Result<Claims, TokenError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(TokenError::Malformed);
    }
    let mut parts = token.split('.');
    let (h, p, s) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some(h), Some(p), Some(s), None) if !h.is_empty() && !p.is_empty() => (h, p, s),
        _ => return Err(TokenError::Malformed),
    };
    let header: Header = decode(h)?;
    if header.alg.as_ref().and_then(Value::as_str) != Some("HS256") {
        return Err(TokenError::Algorithm);
    }
    if header.crit.is_some() {
        return Err(TokenError::Malformed);
    }
    if let Some(typ) = header.typ {
        if !matches!(typ, Value::String(t) if t.eq_ignore_ascii_case("JWT")) {
            return Err(TokenError::Malformed);
        }
    }
    let signature = URL_SAFE_NO_PAD.decode(s).map_err(|_| TokenError::Malformed)?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| TokenError::Signature)?;
    mac.update(h.as_bytes());
    mac.update(b".");
    mac.update(p.as_bytes());
    mac.verify_slice(&signature).map_err(|_| TokenError::Signature)?;

    let payload: Payload = decode(p)?;
    let exp = payload.exp.as_ref().and_then(numeric).ok_or(TokenError::MissingExp)?;
    if now > exp.saturating_add(leeway) {
        return Err(TokenError::Expired);
    }
    if let Some(nbf) = &payload.nbf {
        let nbf = numeric(nbf).ok_or(TokenError::Malformed)?;
        if now.saturating_add(leeway) < nbf {
            return Err(TokenError::NotYetValid);
        }
    }
    let tenant = match payload.claims.get(claim) {
        Some(Value::String(t)) => t.clone(),
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
        _ => return Err(TokenError::MissingTenant),
    };
    if !crate::tenant_id::valid(&tenant) {
        return Err(TokenError::MissingTenant);
    }
    Ok(Claims { tenant, exp })
}

/// Mint a token (used by tests, the demo and the benchmark; a gateway does the same).
pub fn sign(payload: &Value, secret: &[u8]) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let body = URL_SAFE_NO_PAD.encode(payload.to_string().as_bytes());
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(header.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{header}.{body}.{sig}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef";
    const NOW: i64 = 1_800_000_000;

    fn good() -> String {
        sign(&json!({"tenant_id": "acme", "exp": NOW + 60}), SECRET)
    }

    #[test]
    fn accepts_a_valid_token() {
        let c = verify(&good(), SECRET, "tenant_id", NOW, 0).unwrap();
        assert_eq!(c.tenant, "acme");
        assert!(looks_like_token(&good()));
        assert!(!looks_like_token("acme.eu.1"));
    }

    #[test]
    fn refuses_every_forgery() {
        let t = good();
        assert_eq!(verify(&t, b"another-secret-another-secret-xx", "tenant_id", NOW, 0), Err(TokenError::Signature));
        assert_eq!(verify(&t, SECRET, "tenant_id", NOW + 61, 0), Err(TokenError::Expired));
        // leeway tolerates clock skew, and only that much
        assert_eq!(verify(&t, SECRET, "tenant_id", NOW + 70, 5), Err(TokenError::Expired));
        assert!(verify(&t, SECRET, "tenant_id", NOW + 61, 5).is_ok());
        // alg none, with and without a signature
        let none_h = URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#);
        let body = t.split('.').nth(1).unwrap();
        assert_eq!(verify(&format!("{none_h}.{body}."), SECRET, "tenant_id", NOW, 0), Err(TokenError::Algorithm));
        let hs512 = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS512"}"#);
        assert_eq!(verify(&format!("{hs512}.{body}.AAAA"), SECRET, "tenant_id", NOW, 0), Err(TokenError::Algorithm));
        // tampered payload, original signature
        let evil = URL_SAFE_NO_PAD.encode(json!({"tenant_id": "globex", "exp": NOW + 60}).to_string());
        let mut parts: Vec<&str> = t.split('.').collect();
        parts[1] = &evil;
        assert_eq!(verify(&parts.join("."), SECRET, "tenant_id", NOW, 0), Err(TokenError::Signature));
        // missing exp, missing claim, bad claim
        assert_eq!(verify(&sign(&json!({"tenant_id": "acme"}), SECRET), SECRET, "tenant_id", NOW, 0), Err(TokenError::MissingExp));
        assert_eq!(verify(&sign(&json!({"exp": NOW + 5}), SECRET), SECRET, "tenant_id", NOW, 0), Err(TokenError::MissingTenant));
        assert_eq!(verify(&sign(&json!({"tenant_id": "a b", "exp": NOW + 5}), SECRET), SECRET, "tenant_id", NOW, 0), Err(TokenError::MissingTenant));
        assert_eq!(verify(&sign(&json!({"tenant_id": "acme", "exp": NOW + 5, "nbf": NOW + 100}), SECRET), SECRET, "tenant_id", NOW, 0), Err(TokenError::NotYetValid));
        // garbage
        for junk in ["", ".", "..", "a.b.c", "a.b.c.d", &"x".repeat(MAX_TOKEN_LEN + 1)] {
            assert!(verify(junk, SECRET, "tenant_id", NOW, 0).is_err());
        }
    }

    #[test]
    fn claim_name_is_configurable() {
        let t = sign(&json!({"org": 42, "exp": NOW + 60}), SECRET);
        assert_eq!(verify(&t, SECRET, "org", NOW, 0).unwrap().tenant, "42");
        assert_eq!(verify(&t, SECRET, "tenant_id", NOW, 0), Err(TokenError::MissingTenant));
    }
}
