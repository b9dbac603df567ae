//! Secrets from files, the Kubernetes convention: `DATABASE_URL_FILE`, `SCHEMA_REGISTRY_URL_FILE`
//! and `KAFKA_CONFIG_<key>_FILE` name a mounted file whose content becomes `DATABASE_URL`, … .

use super::KAFKA_PASSTHROUGH_PREFIX;

/// Suffix of a variable naming the file that holds another variable's value.
pub const FILE_SUFFIX: &str = "_FILE";

/// Variables (besides `KAFKA_CONFIG_*`) that may come from a file.
const FROM_FILE: &[&str] = &["DATABASE_URL", "SCHEMA_REGISTRY_URL"];

/// Sets each `X` from the file `X_FILE` names (one trailing newline trimmed) and removes `X_FILE`.
/// Call it before any thread starts: it changes the process environment. Errors name the
/// variable and the file, never the content.
pub fn resolve() -> anyhow::Result<()> {
    for (name, path) in std::env::vars() {
        let Some(target) = name.strip_suffix(FILE_SUFFIX) else {
            continue;
        };
        if !FROM_FILE.contains(&target) && !target.starts_with(KAFKA_PASSTHROUGH_PREFIX) {
            continue;
        }
        anyhow::ensure!(
            std::env::var_os(target).is_none(),
            "both {target} and {name} are set: keep one"
        );
        let value = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{name}: reading {path}: {e}"))?;
        let value = value
            .strip_suffix('\n')
            .map(|v| v.strip_suffix('\r').unwrap_or(v))
            .unwrap_or(&value);
        std::env::set_var(target, value);
        std::env::remove_var(&name);
    }
    Ok(())
}
