//! The Avro contract, embedded at build time from `schemas/`, and schema-id resolution: a
//! Confluent-compatible Schema Registry when configured, otherwise `schemas/ids.json`.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use apache_avro::Schema;

use super::error::DecodeError;

pub const REQUEST_SCHEMA: &str = include_str!("../../schemas/persistence_request.avsc");
pub const REQUEST_SCHEMA_V1: &str = include_str!("../../schemas/persistence_request.v1.avsc");
pub const RESULT_SCHEMA: &str = include_str!("../../schemas/persistence_result.avsc");
const LOCAL_IDS: &str = include_str!("../../schemas/ids.json");

/// Every request schema file in `schemas/`, by file name; the current one first.
const REQUEST_FILES: &[(&str, &str)] = &[
    ("persistence_request.avsc", REQUEST_SCHEMA),
    ("persistence_request.v1.avsc", REQUEST_SCHEMA_V1),
];

/// The schema requests are read into (writer schemas are resolved to it).
pub fn request_reader_schema() -> anyhow::Result<Schema> {
    Ok(Schema::parse_str(REQUEST_SCHEMA)?)
}

pub fn result_schema() -> anyhow::Result<Schema> {
    Ok(Schema::parse_str(RESULT_SCHEMA)?)
}

/// All known request schema versions (single-object encoding resolves fingerprints among them).
pub fn request_schemas() -> anyhow::Result<Vec<Schema>> {
    REQUEST_FILES
        .iter()
        .map(|(_, s)| Ok(Schema::parse_str(s)?))
        .collect()
}

/// Schema ids from `schemas/ids.json`.
pub fn local_ids() -> anyhow::Result<HashMap<u32, Arc<Schema>>> {
    let map: HashMap<String, serde_json::Value> = serde_json::from_str(LOCAL_IDS)?;
    let mut out = HashMap::new();
    for (id, file) in map {
        let Ok(id) = id.parse::<u32>() else { continue };
        let file = file.as_str().unwrap_or_default();
        let (_, text) = REQUEST_FILES
            .iter()
            .find(|(name, _)| *name == file)
            .ok_or_else(|| anyhow::anyhow!("schemas/ids.json names unknown file {file:?}"))?;
        out.insert(id, Arc::new(Schema::parse_str(text)?));
    }
    Ok(out)
}

/// Resolves Confluent schema ids to writer schemas.
pub enum SchemaRegistry {
    Local(HashMap<u32, Arc<Schema>>),
    Remote(RemoteRegistry),
}

impl SchemaRegistry {
    pub fn local() -> anyhow::Result<Self> {
        Ok(Self::Local(local_ids()?))
    }

    /// `url` may carry `user:password@` for basic auth.
    pub fn remote(url: &str) -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()?;
        Ok(Self::Remote(RemoteRegistry {
            base: url.trim_end_matches('/').to_string(),
            client,
            cache: RwLock::default(),
        }))
    }

    pub async fn schema(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        match self {
            Self::Local(ids) => ids
                .get(&id)
                .cloned()
                .ok_or(DecodeError::UnknownSchemaId(id)),
            Self::Remote(r) => r.schema(id).await,
        }
    }
}

pub struct RemoteRegistry {
    base: String,
    client: reqwest::Client,
    // Schemas under an id never change in a registry, so the cache needs no expiry.
    cache: RwLock<HashMap<u32, Arc<Schema>>>,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SchemaById {
    schema: String,
    #[serde(default)]
    schema_type: Option<String>,
}

impl RemoteRegistry {
    async fn schema(&self, id: u32) -> Result<Arc<Schema>, DecodeError> {
        if let Some(s) = self.cache.read().expect("registry cache lock").get(&id) {
            return Ok(s.clone());
        }
        let unavailable =
            |e: reqwest::Error| DecodeError::RegistryUnavailable(e.without_url().to_string());
        let resp = self
            .client
            .get(format!("{}/schemas/ids/{id}", self.base))
            .send()
            .await
            .map_err(unavailable)?;
        if resp.status() == reqwest::StatusCode::NOT_FOUND {
            return Err(DecodeError::UnknownSchemaId(id));
        }
        let body: SchemaById = resp
            .error_for_status()
            .map_err(unavailable)?
            .json()
            .await
            .map_err(unavailable)?;
        if body.schema_type.as_deref().is_some_and(|t| t != "AVRO") {
            return Err(DecodeError::UnknownSchemaId(id));
        }
        let schema = Schema::parse_str(&body.schema)
            .map(Arc::new)
            .map_err(|e| DecodeError::Avro(format!("registry schema {id}: {e}")))?;
        self.cache
            .write()
            .expect("registry cache lock")
            .insert(id, schema.clone());
        Ok(schema)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_schemas_parse_and_ids_resolve() {
        assert!(request_reader_schema().is_ok());
        assert!(result_schema().is_ok());
        let ids = local_ids().unwrap();
        assert_eq!(ids.len(), 2);
    }
}
