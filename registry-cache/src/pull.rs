//! Pulling Wasm artifacts from registries, verifying every digest and refusing anything that
//! is not a well-formed, bounded Wasm module. Every body a registry sends (manifests, blobs,
//! token answers, errors) is read with a cap enforced as it streams in.

use crate::artifact::{self, ArtifactError, Format};
use oci_client::secrets::RegistryAuth;
use oci_client::Reference;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};
use reqwest::{Method, StatusCode};
use std::collections::HashMap;
use std::time::Duration;

/// A reqwest error without the query of its URL: a redirect to a CDN carries a pre-signed
/// query that grants the blob, and errors end up in `/status` and the logs.
fn redacted(mut e: reqwest::Error) -> reqwest::Error {
    if let Some(url) = e.url_mut() {
        url.set_query(None);
        url.set_fragment(None);
    }
    e
}

/// An error with its causes: reqwest's errors say "error decoding response body" and keep
/// the reason (a timeout, a reset connection) in their sources.
fn describe(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = s.source();
    }
    text
}

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("invalid image reference {0:?}: {1}")]
    Reference(String, String),
    #[error("registry: {0}")]
    Registry(String),
    #[error(transparent)]
    Artifact(#[from] ArtifactError),
    #[error("refusing {image}: {source}")]
    Signature { image: String, source: crate::sign::VerifyError },
}

#[derive(Debug, Clone)]
pub struct PullOptions {
    /// Registries spoken to over plain HTTP (e.g. `127.0.0.1:5000`).
    pub insecure_registries: Vec<String>,
    /// Extra CA certificates (PEM) to trust.
    pub extra_ca_pem: Vec<Vec<u8>>,
    pub max_module_bytes: u64,
    /// When not empty, an artifact is accepted only with a cosign signature (the upstream's
    /// `sha256-<hex>.sig` tag) of its manifest digest that verifies with one of these keys.
    pub require_signature: Vec<crate::sign::PublicKey>,
    /// Longest wait for a connection or for the next bytes of a response: a registry that
    /// stalls mid-transfer fails the pull instead of holding it forever.
    pub read_timeout: Duration,
    /// Longest a whole pull may take, however steadily the bytes trickle in.
    pub pull_timeout: Duration,
}

impl Default for PullOptions {
    fn default() -> Self {
        Self {
            insecure_registries: vec![],
            extra_ca_pem: vec![],
            max_module_bytes: 64 << 20,
            require_signature: vec![],
            read_timeout: Duration::from_secs(30),
            pull_timeout: Duration::from_secs(300),
        }
    }
}

/// A verified module and where it came from.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub reference: String,
    pub upstream_digest: String,
    pub format: Format,
    pub module: Vec<u8>,
    /// Fingerprints of the `require_signature` keys whose upstream signature verified.
    pub verified_by: Vec<String>,
}

pub struct Puller {
    options: PullOptions,
    /// For access checks. Built once so that checks reuse connections; it holds no
    /// credentials (each request carries its own). An `Err` (a bad extra CA) fails every check.
    http: Result<reqwest::Client, String>,
}

/// Parses an image reference, refusing one whose normalised form (`whole()`, what the cache
/// index stores and every later lookup parses again) would not parse back to itself.
/// oci-spec takes an upper-case first component (`Acme/filter:1`) for a registry host, then
/// normalises it into a Docker Hub repository (`docker.io/Acme/filter:1`) that no longer parses:
/// the entry could never be found again, and its permission checks would key on no repository.
pub fn parse_reference(image: &str) -> Result<Reference, PullError> {
    let refuse = |reason: String| PullError::Reference(image.to_string(), reason);
    let reference = image.parse::<Reference>().map_err(|e| refuse(e.to_string()))?;
    let normal = reference.whole();
    match normal.parse::<Reference>() {
        Ok(again) if again.whole() == normal => Ok(reference),
        _ if reference.repository().bytes().any(|b| b.is_ascii_uppercase()) => {
            Err(refuse("repository name must be lowercase".into()))
        }
        _ => Err(refuse(format!("it normalises to {normal:?}, which does not parse back"))),
    }
}

impl Puller {
    pub fn new(options: PullOptions) -> Self {
        let http = check_client(&options);
        Self { options, http }
    }

    /// Pulls `image` (by tag or digest) and returns its verified module.
    pub async fn pull(&self, image: &str, auth: &RegistryAuth) -> Result<Pulled, PullError> {
        let limit = self.options.pull_timeout;
        tokio::time::timeout(limit, self.pull_unbounded(image, auth)).await.unwrap_or_else(|_| {
            Err(PullError::Registry(format!("pulling {image}: timed out after {}s", limit.as_secs_f32())))
        })
    }

    /// The distribution protocol is spoken here with reqwest rather than through oci-client,
    /// whose pulls read manifests, token answers and error bodies whole before anyone can look
    /// at their size: a registry answering with a body of gigabytes had the cache hold all of
    /// it. Here every body is read with its cap enforced as it streams in.
    async fn pull_unbounded(&self, image: &str, auth: &RegistryAuth) -> Result<Pulled, PullError> {
        let reference = parse_reference(image)?;
        let session = self.session(&reference, auth).await?;
        let tag_or_digest = reference.digest().or(reference.tag()).unwrap_or("latest");
        let raw = session.manifest(tag_or_digest).await?;
        // The digest is computed here, not taken from the registry's header.
        let upstream_digest = format!("sha256:{}", artifact::sha256_hex(&raw));
        if let Some(pinned) = reference.digest() {
            if pinned != upstream_digest {
                return Err(ArtifactError::DigestMismatch { expected: pinned.into(), actual: upstream_digest }.into());
            }
        }
        let manifest = artifact::parse_manifest(&raw)?;
        let wasm = artifact::wasm_layer(&manifest)?;
        let mut verified_by = vec![];
        if !self.options.require_signature.is_empty() {
            verified_by = self.check_signature(&session, &reference, &upstream_digest).await.map_err(|e| match e {
                PullError::Signature { source, .. } => PullError::Signature { image: image.to_string(), source },
                other => other,
            })?;
        }
        let limit = self.options.max_module_bytes;
        if wasm.layer.size as u64 > limit {
            return Err(ArtifactError::TooLarge { what: "layer", limit }.into());
        }
        // Capped while it streams in: a registry that lies about the layer's size cannot make
        // us hold more than the limit.
        let layer = session.blob(&wasm.layer.digest, limit, "layer").await?;
        let module = artifact::into_module(wasm.format, layer, limit)?;
        Ok(Pulled { reference: reference.whole(), upstream_digest, format: wasm.format, module, verified_by })
    }

    /// Requires a cosign signature of `digest` in `reference`'s repository that verifies with a
    /// trusted key, fetched with the same credentials as the artifact.
    async fn check_signature(
        &self,
        session: &Session<'_>,
        reference: &Reference,
        digest: &str,
    ) -> Result<Vec<String>, PullError> {
        use crate::sign::{self, VerifyError};
        let refuse = |source: VerifyError| PullError::Signature { image: reference.whole(), source };
        let tag = sign::signature_tag(digest)?;
        let response = session.get(&format!("manifests/{tag}"), Some(MANIFEST_TYPES)).await?;
        if response.status() == StatusCode::NOT_FOUND {
            return Err(refuse(VerifyError::NoSignature { digest: digest.into(), detail: format!("no tag {tag}") }));
        }
        let raw = read_capped(ok(response).await?, artifact::MAX_MANIFEST_BYTES as u64, "signature manifest").await?;
        let layers = sign::signature_layers(&raw).map_err(refuse)?;
        let mut fetched = vec![];
        for layer in layers {
            if layer.size > sign::MAX_PAYLOAD_BYTES {
                return Err(refuse(VerifyError::Malformed(format!("payload of {} bytes", layer.size))));
            }
            let payload = session.blob(&layer.digest, sign::MAX_PAYLOAD_BYTES, "signature payload").await?;
            fetched.push((layer, payload));
        }
        sign::verify_layers(&fetched, digest, &self.options.require_signature).map_err(refuse)?;
        // Which keys: the cache re-checks its entries when the required keys change.
        Ok(self
            .options
            .require_signature
            .iter()
            .filter(|k| sign::verify_layers(&fetched, digest, std::slice::from_ref(*k)).is_ok())
            .map(sign::PublicKey::fingerprint)
            .collect())
    }

    /// Plain HTTP only for hosts listed as is, as oci-client's `ClientProtocol::HttpsExcept`.
    fn scheme(&self, registry: &str) -> &'static str {
        if self.options.insecure_registries.iter().any(|r| r == registry) {
            "http"
        } else {
            "https"
        }
    }

    /// What a pull of `reference` with `auth` sends as its Authorization, as the registry's
    /// challenge at `/v2/` asks: a pull token for the repository, or the Basic credentials.
    async fn authorization(&self, reference: &Reference, auth: &RegistryAuth) -> Result<Authorization, String> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let registry = reference.resolve_registry();
        let basic = match auth {
            RegistryAuth::Basic(user, password) => {
                use base64::Engine as _;
                Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
                ))
            }
            _ => None,
        };
        match auth {
            // A token the client already holds is presented as is, as oci-client does.
            RegistryAuth::Bearer(token) => Ok(Authorization::Send(Some(format!("Bearer {token}")))),
            _ => match challenge(http, &format!("{}://{registry}/v2/", self.scheme(registry))).await? {
                Challenge::Bearer { realm, service } => {
                    let scope = format!("repository:{}:pull", reference.repository());
                    match bearer_token(http, &realm, service.as_deref(), &scope, basic.as_deref()).await? {
                        Some(token) => Ok(Authorization::Send(Some(format!("Bearer {token}")))),
                        None => Ok(Authorization::Refused(realm)),
                    }
                }
                // Basic, or no authentication at /v2/: the credentials go with the request itself.
                Challenge::Basic | Challenge::None => Ok(Authorization::Send(basic)),
            },
        }
    }

    async fn session<'a>(&'a self, reference: &Reference, auth: &RegistryAuth) -> Result<Session<'a>, PullError> {
        let http = self.http.as_ref().map_err(|e| PullError::Registry(e.clone()))?;
        let authorization = match self.authorization(reference, auth).await.map_err(PullError::Registry)? {
            Authorization::Send(value) => value,
            Authorization::Refused(realm) => {
                return Err(PullError::Registry(format!("token service {realm} refused these credentials")))
            }
        };
        let registry = reference.resolve_registry();
        let base = format!("{}://{registry}/v2/{}", self.scheme(registry), reference.repository());
        Ok(Session { http, base, authorization })
    }

    /// Whether `auth` may read `image` at the upstream registry: the proof a client gives
    /// before a private artifact is served to it, and what tells a refused pull secret from an
    /// outage. `Ok(false)` revokes grants and stops pre-pull retries, so it is the answer only
    /// when the registry or its token service explicitly refuses these credentials. Anything
    /// else (unreachable, too slow, 5xx, 429, a challenge or token we cannot read) is `Err`, on
    /// which callers keep their previous answer.
    ///
    /// The distribution auth flow is spoken here rather than through oci-client: oci-client
    /// reports any failed token request (a 503 as much as a 401) as `AuthenticationFailure`, and
    /// retries anonymously on it, so a token-service outage looked like a refusal.
    pub async fn can_read(&self, image: &str, auth: &RegistryAuth) -> Result<bool, String> {
        let reference = parse_reference(image).map_err(|e| e.to_string())?;
        // A check is a few small responses: bounding the whole of it (not only each
        // wait) keeps a registry that trickles from holding a permission decision.
        let limit = self.options.read_timeout.min(CHECK_TIMEOUT);
        tokio::time::timeout(limit, self.check_access(&reference, auth))
            .await
            .unwrap_or_else(|_| Err(format!("checking access to {image}: no answer within {}s", limit.as_secs_f32())))
    }

    async fn check_access(&self, reference: &Reference, auth: &RegistryAuth) -> Result<bool, String> {
        let http = self.http.as_ref().map_err(Clone::clone)?;
        let registry = reference.resolve_registry();
        let scheme = self.scheme(registry);
        let authorization = match self.authorization(reference, auth).await? {
            Authorization::Send(value) => value,
            Authorization::Refused(_) => return Ok(false),
        };
        let tag_or_digest = reference.digest().or(reference.tag()).unwrap_or("latest");
        let url = format!("{scheme}://{registry}/v2/{}/manifests/{tag_or_digest}", reference.repository());
        let manifest = |method| {
            let request = http.request(method, &url).header(ACCEPT, MANIFEST_TYPES);
            match &authorization {
                Some(value) => request.header(AUTHORIZATION, value),
                None => request,
            }
        };
        let mut status = send(manifest(Method::HEAD)).await?.status();
        if status == StatusCode::METHOD_NOT_ALLOWED {
            // Registries may refuse HEAD on manifests; the GET's body is not read.
            status = send(manifest(Method::GET)).await?.status();
        }
        match status.as_u16() {
            200..=299 => Ok(true),
            // 404 is NAME_UNKNOWN or MANIFEST_UNKNOWN (a HEAD has no body to tell which), and
            // registries answer it for private repositories they will not disclose: either way,
            // these credentials cannot read this image.
            401 | 403 | 404 => Ok(false),
            _ => Err(format!("{url}: HTTP {status}")),
        }
    }
}

/// The manifest types a pull accepts.
const MANIFEST_TYPES: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json";

/// What an error answer's body may add to the error: its start, enough for an OCI error
/// envelope's code and message. The rest is not read.
const MAX_ERROR_BODY_BYTES: usize = 4 << 10;

enum Authorization {
    /// This `Authorization` header, or none.
    Send(Option<String>),
    /// The token service at this realm refused the credentials.
    Refused(String),
}

/// One pull's requests to a repository: the same client, and the same Authorization (a pull
/// token fetched once for the repository, or the Basic credentials) on each.
struct Session<'a> {
    http: &'a reqwest::Client,
    /// `<scheme>://<registry>/v2/<repository>`
    base: String,
    authorization: Option<String>,
}

impl Session<'_> {
    /// `GET <base>/<path>`, whatever the status. Redirects (blobs served from a CDN) are
    /// followed by reqwest, which drops the Authorization header when the host changes.
    async fn get(&self, path: &str, accept: Option<&str>) -> Result<reqwest::Response, PullError> {
        let mut request = self.http.get(format!("{}/{path}", self.base));
        if let Some(accept) = accept {
            request = request.header(ACCEPT, accept);
        }
        if let Some(value) = &self.authorization {
            request = request.header(AUTHORIZATION, value);
        }
        send(request).await.map_err(PullError::Registry)
    }

    /// The manifest under `tag_or_digest`, at most `MAX_MANIFEST_BYTES`.
    async fn manifest(&self, tag_or_digest: &str) -> Result<Vec<u8>, PullError> {
        let response = ok(self.get(&format!("manifests/{tag_or_digest}"), Some(MANIFEST_TYPES)).await?).await?;
        read_capped(response, artifact::MAX_MANIFEST_BYTES as u64, "manifest").await
    }

    /// The blob `digest`, at most `limit` bytes, verified against its digest.
    async fn blob(&self, digest: &str, limit: u64, what: &'static str) -> Result<Vec<u8>, PullError> {
        artifact::digest_hex(digest)?;
        let response = ok(self.get(&format!("blobs/{digest}"), None).await?).await?;
        let bytes = read_capped(response, limit, what).await?;
        artifact::verify_digest(&bytes, digest)?;
        Ok(bytes)
    }
}

/// `response` if it is a success; otherwise an error naming its status and what the start of
/// its body says (at most `MAX_ERROR_BODY_BYTES` of it is read).
async fn ok(mut response: reqwest::Response) -> Result<reqwest::Response, PullError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    // Without its query: a redirect target's query may be a pre-signed grant for the blob.
    let mut url = response.url().clone();
    url.set_query(None);
    url.set_fragment(None);
    let mut body = Vec::new();
    while body.len() < MAX_ERROR_BODY_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk),
            _ => break,
        }
    }
    body.truncate(MAX_ERROR_BODY_BYTES);
    #[derive(serde::Deserialize)]
    struct Envelope {
        errors: Vec<OciError>,
    }
    #[derive(serde::Deserialize)]
    struct OciError {
        code: String,
        #[serde(default)]
        message: String,
    }
    let detail = match serde_json::from_slice::<Envelope>(&body) {
        Ok(envelope) => {
            envelope.errors.iter().map(|e| format!("{}: {}", e.code, e.message)).collect::<Vec<_>>().join("; ")
        }
        Err(_) => String::from_utf8_lossy(&body).chars().filter(|c| !c.is_control()).take(200).collect(),
    };
    let detail = detail.trim();
    Err(PullError::Registry(if detail.is_empty() {
        format!("{url}: HTTP {status}")
    } else {
        format!("{url}: HTTP {status}: {detail}")
    }))
}

/// The body of `response`, refused as soon as it is known to exceed `limit`: from its
/// Content-Length before reading any of it, or as it streams in, so that at most `limit` and
/// one network chunk are ever held, whatever the registry sends.
async fn read_capped(mut response: reqwest::Response, limit: u64, what: &'static str) -> Result<Vec<u8>, PullError> {
    let too_large = || PullError::Artifact(ArtifactError::TooLarge { what, limit });
    if response.content_length().is_some_and(|declared| declared > limit) {
        return Err(too_large());
    }
    // Room for what it announces (within the cap), so that a large layer is not copied as
    // the buffer grows.
    let mut body = Vec::with_capacity(response.content_length().unwrap_or(0).min(limit) as usize);
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| PullError::Registry(format!("reading the {what}: {}", describe(&redacted(e)))))?
    {
        if (body.len() + chunk.len()) as u64 > limit {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Requests one `Puller::can_read` sends at most, short of redirects: the `/v2/` challenge, a
/// token, the manifest HEAD, and a GET when HEAD is not allowed.
pub const MAX_UPSTREAM_REQUESTS_PER_CHECK: usize = 4;

/// Longest an access check may take, when `read_timeout` does not make it shorter.
const CHECK_TIMEOUT: Duration = Duration::from_secs(10);

/// A token endpoint's answer is a few KiB; more is not a token.
const MAX_TOKEN_RESPONSE_BYTES: usize = 64 << 10;

fn check_client(options: &PullOptions) -> Result<reqwest::Client, String> {
    let mut builder =
        reqwest::Client::builder().connect_timeout(options.read_timeout).read_timeout(options.read_timeout);
    for pem in &options.extra_ca_pem {
        for certificate in reqwest::Certificate::from_pem_bundle(pem).map_err(|e| describe(&e))? {
            builder = builder.add_root_certificate(certificate);
        }
    }
    builder.build().map_err(|e| describe(&e))
}

async fn send(request: reqwest::RequestBuilder) -> Result<reqwest::Response, String> {
    request.send().await.map_err(|e| describe(&redacted(e)))
}

/// How the registry asks to be authenticated, from its answer to `GET /v2/`.
enum Challenge {
    None,
    Basic,
    Bearer { realm: String, service: Option<String> },
}

async fn challenge(http: &reqwest::Client, url: &str) -> Result<Challenge, String> {
    let response = send(http.get(url)).await?;
    if response.status().is_success() {
        return Ok(Challenge::None);
    }
    if response.status() != StatusCode::UNAUTHORIZED {
        return Err(format!("{url}: HTTP {}", response.status()));
    }
    let challenges: Vec<_> = response
        .headers()
        .get_all(WWW_AUTHENTICATE)
        .iter()
        .filter_map(|value| parse_challenge(value.to_str().ok()?))
        .collect();
    if let Some((_, params)) = challenges.iter().find(|(scheme, _)| scheme == "bearer") {
        let realm = params.get("realm").ok_or_else(|| format!("{url}: Bearer challenge without a realm"))?;
        return Ok(Challenge::Bearer { realm: realm.clone(), service: params.get("service").cloned() });
    }
    if challenges.iter().any(|(scheme, _)| scheme == "basic") {
        return Ok(Challenge::Basic);
    }
    Err(format!("{url}: HTTP 401 without a Bearer or Basic challenge"))
}

/// A pull token for `scope` from the token service at `realm`, presenting `basic` (or nothing,
/// for an anonymous token). `None`: the service refused these credentials.
async fn bearer_token(
    http: &reqwest::Client,
    realm: &str,
    service: Option<&str>,
    scope: &str,
    basic: Option<&str>,
) -> Result<Option<String>, String> {
    let mut request = http.get(realm).query(&[("scope", scope)]);
    if let Some(service) = service {
        request = request.query(&[("service", service)]);
    }
    if let Some(basic) = basic {
        request = request.header(AUTHORIZATION, basic);
    }
    let mut response = send(request).await?;
    match response.status() {
        StatusCode::OK => {}
        StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN => return Ok(None),
        status => return Err(format!("token service {realm}: HTTP {status}")),
    }
    let too_large = || format!("token service {realm}: answer over {MAX_TOKEN_RESPONSE_BYTES} bytes");
    if response.content_length().is_some_and(|declared| declared > MAX_TOKEN_RESPONSE_BYTES as u64) {
        return Err(too_large());
    }
    let mut body = Vec::new();
    while let Some(chunk) =
        response.chunk().await.map_err(|e| format!("token service {realm}: {}", describe(&redacted(e))))?
    {
        if body.len() + chunk.len() > MAX_TOKEN_RESPONSE_BYTES {
            return Err(too_large());
        }
        body.extend_from_slice(&chunk);
    }
    // Docker's token services answer `token`; OAuth2-style ones `access_token`.
    #[derive(serde::Deserialize)]
    struct Token {
        token: Option<String>,
        access_token: Option<String>,
    }
    let answer: Token =
        serde_json::from_slice(&body).map_err(|e| format!("token service {realm}: unreadable answer: {e}"))?;
    match answer.token.or(answer.access_token) {
        Some(token) if !token.is_empty() => Ok(Some(token)),
        _ => Err(format!("token service {realm}: answer without a token")),
    }
}

/// `Bearer realm="https://auth.example/token",service="registry.example"` as the lower-case
/// scheme and the parameters (lower-case names). `None` when malformed.
fn parse_challenge(header: &str) -> Option<(String, HashMap<String, String>)> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(char::is_whitespace).unwrap_or((header, ""));
    let mut params = HashMap::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Some((scheme.to_ascii_lowercase(), params));
        }
        let mut name = String::new();
        while let Some(c) = chars.next_if(|c| *c != '=') {
            name.push(c);
        }
        chars.next()?;
        let mut value = String::new();
        if chars.next_if_eq(&'"').is_some() {
            // A quoted string (a scope's commas are inside one), with backslash escapes.
            loop {
                match chars.next()? {
                    '"' => break,
                    '\\' => value.push(chars.next()?),
                    c => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| *c != ',') {
                value.push(c);
            }
        }
        params.insert(name.trim().to_ascii_lowercase(), value.trim().to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges_parse_with_quoted_commas_and_refuse_malformed_ones() {
        let (scheme, params) = parse_challenge(
            r#"Bearer realm="https://auth.example/token",service="reg \"x\"", scope="repository:a/b:pull,push""#,
        )
        .unwrap();
        assert_eq!(scheme, "bearer");
        assert_eq!(params["realm"], "https://auth.example/token");
        assert_eq!(params["service"], r#"reg "x""#);
        assert_eq!(params["scope"], "repository:a/b:pull,push");
        assert_eq!(parse_challenge(r#"Basic realm=Registry"#).unwrap().1["realm"], "Registry");
        assert!(parse_challenge(r#"Bearer realm="https://unterminated"#).is_none());
        assert!(parse_challenge("Bearer realm").is_none());
    }

    /// Found by `cargo fuzz run cache_reference`: accepted, then stored as a reference that
    /// does not parse.
    #[test]
    fn fuzz_regression_uppercase_first_component_is_refused() {
        let input: &[u8] = b"ohttp000FALSE00000000000000000000000v0000000000000000/filter:1.0";
        let image = std::str::from_utf8(input).unwrap_or_default();
        let err = parse_reference(image).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err.contains("must be lowercase"), "{err}");
        assert!(parse_reference("Acme/filter:1").is_err());
        // Lower-case names, registries with ports and digests still parse, and round-trip.
        let digest = format!("ghcr.io/a/b:v1@sha256:{}", "0".repeat(64));
        for image in ["acme/filter:1", "ghcr.io/a/b:v1", "localhost:5000/team/x", "nginx", digest.as_str()] {
            let r = parse_reference(image).map(|r| r.whole()).unwrap_or_default();
            assert_eq!(parse_reference(&r).map(|again| again.whole()).ok(), Some(r), "{image}");
        }
    }
}
