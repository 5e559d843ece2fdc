//! Envoy Gateway's CRD schemas (`tests/fixtures/envoy-gateway/crds/`, copied from Envoy Gateway
//! with their provenance), to validate what the project ships and renders.

use anyhow::Context as _;
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::envoy::workspace_root;

/// Envoy Gateway's reference data that the project carries (see its README).
pub fn envoy_gateway_fixtures() -> PathBuf {
    workspace_root().join("tests/fixtures/envoy-gateway")
}

/// The CRD schemas: the copy in the repository, or `EG_CRD_DIR` to try another release's.
pub fn crd_dir() -> PathBuf {
    std::env::var_os("EG_CRD_DIR").map(PathBuf::from).unwrap_or_else(|| envoy_gateway_fixtures().join("crds"))
}

/// Every document of a multi-document YAML file or string.
pub fn yaml_docs(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading YAML file {}", path.display()))?;
    yaml_docs_str(&text).with_context(|| format!("parsing YAML file {}", path.display()))
}

pub fn yaml_docs_str(text: &str) -> anyhow::Result<Vec<Value>> {
    let mut docs = vec![];
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let v: Value = serde::Deserialize::deserialize(doc)?;
        if !v.is_null() {
            docs.push(v);
        }
    }
    Ok(docs)
}

/// Kubernetes drops unknown fields silently; a typo in a policy then does nothing at all.
/// Validate strictly instead: objects with declared properties admit no others.
pub fn strict(schema: &mut Value) {
    if let Some(obj) = schema.as_object_mut() {
        let preserve = obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
        if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
            obj.insert("additionalProperties".into(), Value::Bool(false));
        }
        for v in obj.values_mut() {
            strict(v);
        }
    } else if let Some(arr) = schema.as_array_mut() {
        arr.iter_mut().for_each(strict);
    }
}

/// Schemas by (apiVersion, kind), from every CRD in [`crd_dir`].
pub fn schemas() -> anyhow::Result<HashMap<(String, String), Value>> {
    schemas_in(&crd_dir())
}

/// Schemas by (apiVersion, kind), from every CRD in `dir`.
pub fn schemas_in(dir: &Path) -> anyhow::Result<HashMap<(String, String), Value>> {
    let mut out = HashMap::new();
    let entries = std::fs::read_dir(dir).with_context(|| {
        format!(
            "reading {}: expected Envoy Gateway's CRD YAML files (see tests/fixtures/envoy-gateway/README.md)",
            dir.display()
        )
    })?;
    for entry in entries {
        let path = entry.with_context(|| format!("listing {}", dir.display()))?.path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for crd in yaml_docs(&path)? {
            if crd["kind"] != "CustomResourceDefinition" {
                continue;
            }
            let group = crd["spec"]["group"].as_str().unwrap_or_default().to_string();
            let kind = crd["spec"]["names"]["kind"].as_str().unwrap_or_default().to_string();
            for version in crd["spec"]["versions"].as_array().into_iter().flatten() {
                let mut schema = version["schema"]["openAPIV3Schema"].clone();
                // Objects' metadata is checked by the API server, not the CRD.
                if let Some(props) = schema["properties"].as_object_mut() {
                    props.insert("metadata".into(), serde_json::json!({"type": "object"}));
                }
                strict(&mut schema);
                let api = format!("{group}/{}", version["name"].as_str().unwrap_or_default());
                out.insert((api, kind.clone()), schema);
            }
        }
    }
    if out.is_empty() {
        anyhow::bail!("{}: no CustomResourceDefinition found in its *.yaml files", dir.display());
    }
    Ok(out)
}

pub fn validate(schemas: &HashMap<(String, String), Value>, doc: &Value) -> Result<bool, Vec<String>> {
    let key = (
        doc["apiVersion"].as_str().unwrap_or_default().to_string(),
        doc["kind"].as_str().unwrap_or_default().to_string(),
    );
    let Some(schema) = schemas.get(&key) else { return Ok(false) };
    let validator = jsonschema::draft4::new(schema).map_err(|e| vec![e.to_string()])?;
    let errors: Vec<String> = validator.iter_errors(doc).map(|e| format!("{}: {e}", e.instance_path)).collect();
    if errors.is_empty() {
        Ok(true)
    } else {
        Err(errors)
    }
}
