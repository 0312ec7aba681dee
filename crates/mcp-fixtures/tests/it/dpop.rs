//! The `dpop` knob over real HTTP: the token endpoint and the resource server require valid
//! DPoP proofs with their own nonces, bind tokens to the proof's key, and refuse a bound token
//! with another key or without a proof. Proofs are signed here with p256 directly (the
//! fixtures must not depend on the client under test).

use crate::common;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use common::{REDIRECT, TestClient, authorize, http, oauth_error, register, s};
use mcp_clock::{Clock as _, SystemClock};
use mcp_fixtures::{ClientAuth, Fixtures};
use p256::ecdsa::signature::Signer as _;
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};

/// A test-side DPoP key.
struct Key(p256::ecdsa::SigningKey);

impl Key {
    fn new(seed: u8) -> Self {
        Key(p256::ecdsa::SigningKey::from_bytes(&[seed; 32].into()).unwrap())
    }

    fn jwk(&self) -> Value {
        let point = self.0.verifying_key().to_sec1_point(false);
        json!({"crv": "P-256", "kty": "EC",
            "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())})
    }

    fn thumbprint(&self) -> String {
        let j = self.jwk();
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            j["x"].as_str().unwrap(),
            j["y"].as_str().unwrap()
        );
        B64.encode(Sha256::digest(canonical.as_bytes()))
    }

    /// A proof with these claims (`iat` now unless given).
    fn proof(&self, htm: &str, htu: &str, token: Option<&str>, nonce: Option<&str>) -> String {
        self.proof_with(htm, htu, token, nonce, |_| {})
    }

    fn proof_with(
        &self,
        htm: &str,
        htu: &str,
        token: Option<&str>,
        nonce: Option<&str>,
        change: impl FnOnce(&mut Value),
    ) -> String {
        static JTI: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk()});
        let jti = JTI.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let mut claims = json!({"jti": format!("jti-{jti}"), "htm": htm, "htu": htu,
            "iat": SystemClock.now().as_secs()});
        if let Some(t) = token {
            claims["ath"] = B64.encode(Sha256::digest(t.as_bytes())).into();
        }
        if let Some(n) = nonce {
            claims["nonce"] = n.into();
        }
        change(&mut claims);
        let input =
            format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims.to_string()));
        let sig: p256::ecdsa::Signature = self.0.sign(input.as_bytes());
        format!("{input}.{}", B64.encode(sig.to_bytes()))
    }
}

async fn token_request(
    url: &str,
    client: &TestClient,
    form: &[(&str, &str)],
    proof: Option<String>,
) -> reqwest::Response {
    let mut form: Vec<(&str, &str)> = form.to_vec();
    form.push(("client_id", &client.id));
    let mut req = http().post(url).form(&form);
    if let Some(p) = proof {
        req = req.header("dpop", p);
    }
    req.send().await.unwrap()
}

async fn mcp_post(url: &str, auth: &str, proof: Option<String>) -> reqwest::Response {
    let body = r#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"t","version":"1"}}}"#;
    let mut req = http()
        .post(url)
        .header("authorization", auth)
        .header("content-type", "application/json")
        .header("accept", "application/json, text/event-stream")
        .body(body);
    if let Some(p) = proof {
        req = req.header("dpop", p);
    }
    req.send().await.unwrap()
}

fn header(resp: &reqwest::Response, name: &str) -> String {
    resp.headers().get(name).map(|v| v.to_str().unwrap().to_owned()).unwrap_or_default()
}

/// Every rule of the knob, in one session: the metadata advertises ES256; the token endpoint
/// refuses a missing or invalid proof, asks for its nonce once, issues `DPoP` tokens bound to
/// the key, and refuses a replayed `jti`; the resource server refuses Bearer, a proof without
/// its (own) nonce, a proof by another key or for another token; a bound refresh token is
/// refused with another key or without a proof, and works with its key. Counters count it.
#[tokio::test]
async fn the_dpop_knob_enforces_proofs_nonces_and_key_binding() {
    let fx = Fixtures::start().await.unwrap();
    let (auth, rs) = (fx.auth(), fx.resource());
    let meta: Value = http()
        .get(format!("{}/.well-known/oauth-authorization-server", auth.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(meta.get("dpop_signing_alg_values_supported").is_none(), "off by default");
    auth.knobs().set_dpop(true);
    let meta: Value = http()
        .get(format!("{}/.well-known/oauth-authorization-server", auth.base_url()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["dpop_signing_alg_values_supported"], json!(["ES256"]));

    let client = register(auth, ClientAuth::None);
    let token_url = auth.token_endpoint();
    let (key, other) = (Key::new(7), Key::new(9));
    let (code, verifier) = authorize(auth, &client.id, Some("mcp:tools"), Some(rs.url())).await;
    let form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("redirect_uri", REDIRECT),
        ("code_verifier", verifier.as_str()),
    ];
    // No proof; a bad signature; another URL; a stale iat: invalid_dpop_proof.
    let refused = token_request(&token_url, &client, &form, None).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()));
    let mut forged = key.proof("POST", &token_url, None, None);
    forged.replace_range(forged.len() - 4.., "AAAA");
    let refused = token_request(&token_url, &client, &form, Some(forged)).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()));
    let elsewhere = key.proof("POST", &format!("{token_url}x"), None, None);
    let refused = token_request(&token_url, &client, &form, Some(elsewhere)).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()));
    let stale = key.proof_with("POST", &token_url, None, None, |c| {
        c["iat"] = (c["iat"].as_u64().unwrap() - 3600).into();
    });
    let refused = token_request(&token_url, &client, &form, Some(stale)).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()));
    // A valid proof without the nonce: use_dpop_nonce, with the nonce in DPoP-Nonce.
    let refused =
        token_request(&token_url, &client, &form, Some(key.proof("POST", &token_url, None, None)))
            .await;
    let as_nonce = header(&refused, "dpop-nonce");
    assert!(!as_nonce.is_empty());
    assert_eq!(oauth_error(refused).await, (400, "use_dpop_nonce".into()));
    // With it: a DPoP token bound to the key.
    let proof = key.proof("POST", &token_url, None, Some(&as_nonce));
    let resp = token_request(&token_url, &client, &form, Some(proof.clone())).await;
    assert_eq!(resp.status(), 200);
    let tokens: Value = resp.json().await.unwrap();
    assert_eq!(tokens["token_type"], "DPoP");
    let (at, rt) = (s(&tokens, "access_token"), s(&tokens, "refresh_token"));
    // The same proof again (a replayed jti) is refused.
    let refresh_form = [("grant_type", "refresh_token"), ("refresh_token", rt.as_str())];
    let replayed = token_request(&token_url, &client, &refresh_form, Some(proof)).await;
    assert_eq!(oauth_error(replayed).await, (400, "invalid_dpop_proof".into()));
    let stats = auth.stats();
    assert_eq!((stats.dpop_proofs_refused, stats.dpop_nonce_challenges), (5, 1));

    // The resource server: Bearer is refused with a DPoP challenge.
    let url = rs.url();
    let refused = mcp_post(url, &format!("Bearer {at}"), None).await;
    assert_eq!(refused.status(), 401);
    assert!(header(&refused, "www-authenticate").starts_with("DPoP "), "{refused:?}");
    // Its own nonce (not the authorization server's).
    let refused = mcp_post(
        url,
        &format!("DPoP {at}"),
        Some(key.proof("POST", url, Some(&at), Some(&as_nonce))),
    )
    .await;
    assert_eq!(refused.status(), 401);
    assert!(header(&refused, "www-authenticate").contains("error=\"use_dpop_nonce\""));
    let rs_nonce = header(&refused, "dpop-nonce");
    assert!(!rs_nonce.is_empty() && rs_nonce != as_nonce);
    // Another key, another token's ath: refused; the key and the nonce: through.
    let by_other = other.proof("POST", url, Some(&at), Some(&rs_nonce));
    assert_eq!(mcp_post(url, &format!("DPoP {at}"), Some(by_other)).await.status(), 401);
    let wrong_ath = key.proof("POST", url, Some("another token"), Some(&rs_nonce));
    assert_eq!(mcp_post(url, &format!("DPoP {at}"), Some(wrong_ath)).await.status(), 401);
    let good = key.proof("POST", url, Some(&at), Some(&rs_nonce));
    assert_eq!(mcp_post(url, &format!("DPoP {at}"), Some(good)).await.status(), 200);
    let rstats = rs.stats();
    assert_eq!(
        (rstats.dpop_proofs_refused, rstats.dpop_nonce_challenges, rstats.dpop_accepted),
        (3, 1, 1)
    );

    // The bound refresh token: another key, or no proof, is refused; its key works.
    let by_other = other.proof("POST", &token_url, None, Some(&as_nonce));
    let refused = token_request(&token_url, &client, &refresh_form, Some(by_other)).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()));
    auth.knobs().set_dpop(false);
    let refused = token_request(&token_url, &client, &refresh_form, None).await;
    assert_eq!(oauth_error(refused).await, (400, "invalid_dpop_proof".into()), "bound for good");
    auth.knobs().set_dpop(true);
    let proof = key.proof("POST", &token_url, None, Some(&as_nonce));
    let resp = token_request(&token_url, &client, &refresh_form, Some(proof)).await;
    assert_eq!(resp.status(), 200);
    let refreshed: Value = resp.json().await.unwrap();
    assert_eq!(refreshed["token_type"], "DPoP");
    // Introspection names the binding.
    let confidential = register(auth, ClientAuth::ClientSecretBasic);
    let resp = common::post_form(
        &auth.introspection_endpoint(),
        &confidential,
        &[("token", &s(&refreshed, "access_token"))],
    )
    .await;
    let body: Value = resp.json().await.unwrap();
    assert_eq!(
        (body["token_type"].clone(), body["cnf"]["jkt"].clone()),
        (json!("DPoP"), json!(key.thumbprint()))
    );
}
