//! The daemon's runtime state on disk (`state.json` in the state directory): the services it
//! runs, with their ids, and a digest of the config file they came from. Written after every
//! runtime change (atomically: a new file renamed over the old), read at start.
//!
//! Precedence at start: if the config file is unchanged since the state was written (same
//! digest), the state wins, so changes made at runtime (weights, drains, services and backends
//! added or removed) survive a restart. If the config file changed since, the config wins: an
//! edit of the file is the newer intent. Either way, ids are kept by service name and backend
//! address, so adopted flows stay with their backends. `lb reload` makes the config win at once.

use std::{
    io::Write as _,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::layout::{self, PlacedService};

pub const FILE: &str = "state.json";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Persisted {
    /// `digest` of the config file's text this state descends from.
    pub config_digest: String,
    pub services: Vec<PlacedService>,
}

#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a state file lb wrote: {message}")]
    Invalid { path: String, message: String },
}

/// FNV-1a, 64 bits, as hex: stable across builds and platforms, which std's hashers are not.
pub fn digest(text: &str) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in text.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{hash:016x}")
}

/// The state in `dir`, if there is one; a file that does not parse or check is an error.
pub fn load(dir: &Path) -> Result<Option<Persisted>, PersistError> {
    let path = dir.join(FILE);
    let p = path.display().to_string();
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(PersistError::Io { path: p, source }),
    };
    let invalid = |message: String| PersistError::Invalid {
        path: p.clone(),
        message,
    };
    let state: Persisted = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
    check(&state).map_err(invalid)?;
    Ok(Some(state))
}

fn check(state: &Persisted) -> Result<(), String> {
    let configs: Vec<_> = state.services.iter().map(|s| s.config.clone()).collect();
    layout::check(&configs)?;
    let mut services = std::collections::HashSet::new();
    let mut backends = std::collections::HashSet::new();
    for s in &state.services {
        if s.id >= lb_common::MAX_SERVICES || !services.insert(s.id) {
            return Err(format!("service id {} is out of range or used twice", s.id));
        }
        if s.backend_ids.len() != s.config.backends.len() {
            return Err(format!(
                "service \"{}\" has {} backends but {} ids",
                s.config.name,
                s.config.backends.len(),
                s.backend_ids.len()
            ));
        }
        for &id in &s.backend_ids {
            if id >= lb_common::MAX_BACKENDS || !backends.insert(id) {
                return Err(format!("backend id {id} is out of range or used twice"));
            }
        }
    }
    Ok(())
}

/// Writes the state into `dir`: to a temporary file first, synced, then renamed over the old
/// one, so a crash leaves either the old state or the new, never half of one.
pub fn save(dir: &Path, state: &Persisted) -> Result<(), PersistError> {
    let path = dir.join(FILE);
    let tmp: PathBuf = dir.join(format!("{FILE}.tmp"));
    let io = |path: &Path| {
        let p = path.display().to_string();
        move |source| PersistError::Io { path: p, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut text = serde_json::to_string_pretty(state).expect("the state always serialises");
    text.push('\n');
    let mut file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    file.write_all(text.as_bytes()).map_err(io(&tmp))?;
    file.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    // The rename is the directory's change: until the directory is synced, a crash may leave
    // the old file, or none.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
}

/// Moves an unusable state file aside (kept for inspection) so the daemon can start from the
/// config. Returns where it went.
pub fn set_aside(dir: &Path) -> Option<PathBuf> {
    let to = dir.join(format!("{FILE}.bad"));
    std::fs::rename(dir.join(FILE), &to).ok().map(|()| to)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-persist-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn sample() -> Persisted {
        let config = Config::parse(
            r#"
interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[service.health]
kind = "http"
path = "/health"
[[service.backend]]
address = "198.18.1.11:8000"
weight = 4
"#,
            "test",
        )
        .expect("config");
        let (services, _) = layout::place(&config.services, &[], &[]).expect("place");
        Persisted {
            config_digest: digest("x"),
            services,
        }
    }

    #[test]
    fn the_state_round_trips_and_the_write_is_atomic() {
        let d = dir("round");
        assert_eq!(load(&d).expect("missing is fine"), None);
        let state = sample();
        save(&d, &state).expect("save");
        assert_eq!(load(&d).expect("load"), Some(state));
        assert!(!d.join(format!("{FILE}.tmp")).exists());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_or_inconsistent_file_is_an_error_and_can_be_set_aside() {
        let d = dir("bad");
        std::fs::create_dir_all(&d).expect("dir");
        std::fs::write(d.join(FILE), "{\"config_digest\": \"x\", \"servi").expect("write");
        assert!(matches!(load(&d), Err(PersistError::Invalid { .. })));
        let mut state = sample();
        state.services[0].backend_ids.push(7);
        save(&d, &state).expect("save");
        let err = load(&d).expect_err("ids do not match");
        assert!(err.to_string().contains("ids"), "{err}");
        assert!(set_aside(&d).is_some());
        assert_eq!(load(&d).expect("gone"), None);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn digests_are_stable() {
        assert_eq!(digest(""), "cbf29ce484222325");
        assert_eq!(digest("a"), "af63dc4c8601ec8c");
        assert_ne!(digest("weight = 4"), digest("weight = 6"));
    }
}
