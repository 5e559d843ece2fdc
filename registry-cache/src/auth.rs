//! Registry credentials: Docker `config.json` and Kubernetes `kubernetes.io/dockerconfigjson`
//! Secrets, as Envoy Gateway's `pullSecretRef` names them.

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde::Deserialize;
use std::collections::BTreeMap;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("not a Docker config.json or dockerconfigjson Secret: {0}")]
    Malformed(String),
}

#[derive(Debug, Default, Deserialize)]
struct DockerConfig {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
}

#[derive(Debug, Default, Deserialize)]
struct AuthEntry {
    auth: Option<String>,
    username: Option<String>,
    password: Option<String>,
    #[serde(rename = "identitytoken")]
    identity_token: Option<String>,
}

/// A config.json, or a Secret (YAML or JSON) whose `data[".dockerconfigjson"]` holds one.
pub fn parse_docker_config(bytes: &[u8]) -> Result<BTreeMap<String, RegistryAuth>, AuthError> {
    let malformed = |e: String| AuthError::Malformed(e);
    let value: serde_json::Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(_) => serde_yaml_ng::from_slice(bytes).map_err(|e| malformed(e.to_string()))?,
    };
    let config: DockerConfig = if let Some(data) = value.pointer("/data/.dockerconfigjson").and_then(|v| v.as_str()) {
        let raw =
            base64::engine::general_purpose::STANDARD.decode(data.trim()).map_err(|e| malformed(e.to_string()))?;
        serde_json::from_slice(&raw).map_err(|e| malformed(e.to_string()))?
    } else if let Some(data) = value.pointer("/stringData/.dockerconfigjson").and_then(|v| v.as_str()) {
        serde_json::from_str(data).map_err(|e| malformed(e.to_string()))?
    } else {
        serde_json::from_value(value).map_err(|e| malformed(e.to_string()))?
    };
    let mut out = BTreeMap::new();
    for (server, entry) in config.auths {
        let auth = if let Some(token) = entry.identity_token.filter(|t| !t.is_empty()) {
            RegistryAuth::Bearer(token)
        } else if let (Some(u), Some(p)) = (entry.username, entry.password) {
            RegistryAuth::Basic(u, p)
        } else if let Some(encoded) = entry.auth {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(encoded.trim())
                .map_err(|e| malformed(e.to_string()))?;
            let text = String::from_utf8(raw).map_err(|e| malformed(e.to_string()))?;
            let (u, p) =
                text.split_once(':').ok_or_else(|| malformed(format!("auth for {server} is not user:password")))?;
            RegistryAuth::Basic(u.to_string(), p.to_string())
        } else {
            continue;
        };
        out.insert(registry_host(&server), auth);
    }
    Ok(out)
}

/// `https://index.docker.io/v1/` and `registry:5000/some/path` → the host part.
fn registry_host(server: &str) -> String {
    let s = server.trim_start_matches("https://").trim_start_matches("http://");
    let host = s.split('/').next().unwrap_or(s);
    if host == "index.docker.io" {
        "docker.io".into()
    } else {
        host.to_string()
    }
}

/// The credentials for `registry` from a parsed config, anonymous if none.
pub fn for_registry(auths: &BTreeMap<String, RegistryAuth>, registry: &str) -> RegistryAuth {
    auths.get(&registry_host(registry)).cloned().unwrap_or(RegistryAuth::Anonymous)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn config_json_with_auth_and_with_fields() {
        let json = format!(
            r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{}"}},"https://index.docker.io/v1/":{{"username":"u","password":"p"}}}}}}"#,
            b64("alice:s3cret")
        );
        let auths = parse_docker_config(json.as_bytes()).unwrap();
        assert_eq!(for_registry(&auths, "127.0.0.1:5000"), RegistryAuth::Basic("alice".into(), "s3cret".into()));
        assert_eq!(for_registry(&auths, "docker.io"), RegistryAuth::Basic("u".into(), "p".into()));
        assert_eq!(for_registry(&auths, "ghcr.io"), RegistryAuth::Anonymous);
    }

    #[test]
    fn kubernetes_secret() {
        let config = format!(r#"{{"auths":{{"reg.example:443":{{"auth":"{}"}}}}}}"#, b64("bob:pw:with:colons"));
        let secret = format!(
            "apiVersion: v1\nkind: Secret\ntype: kubernetes.io/dockerconfigjson\ndata:\n  .dockerconfigjson: {}\n",
            b64(&config)
        );
        let auths = parse_docker_config(secret.as_bytes()).unwrap();
        assert_eq!(for_registry(&auths, "reg.example:443"), RegistryAuth::Basic("bob".into(), "pw:with:colons".into()));
    }

    #[test]
    fn garbage_is_refused() {
        assert!(parse_docker_config(b"[1,2").is_err());
        assert!(parse_docker_config(br#"{"auths":{"r":{"auth":"!!notbase64"}}}"#).is_err());
        assert!(
            parse_docker_config(format!(r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#, b64("nocolon")).as_bytes()).is_err()
        );
    }
}
