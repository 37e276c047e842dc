//! `registry --service-config-dir DIR`: service configs kept as files, one
//! `<service>.json` each, so they survive a restart of the in-memory store
//! and can be managed as files (a ConfigMap, a git checkout).
//!
//! The directory is the source of truth both ways: the registry reads it
//! at start and again whenever a file changes, is added or goes away (it
//! looks every [`POLL`]), and `config set`/`delete` write or remove the
//! file as well as changing the store. A file that does not validate is
//! logged and skipped, and the config it would replace stays.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::store::Store;
use super::validate;
use crate::service_config::ServiceConfig;

/// How often the directory is read for changes.
pub const POLL: Duration = Duration::from_secs(1);

/// A directory of service configs.
#[derive(Debug)]
pub struct ConfigDir {
    path: PathBuf,
    /// Each file's text as last applied or written, by service: a file
    /// whose text is unchanged is not applied again.
    seen: Mutex<HashMap<String, String>>,
}

impl ConfigDir {
    /// The directory at `path`, created if missing.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(path)?;
        if !path.is_dir() {
            return Err(std::io::Error::other(format!(
                "{} is not a directory",
                path.display()
            )));
        }
        Ok(Self {
            path: path.to_owned(),
            seen: Mutex::default(),
        })
    }

    fn file(&self, service: &str) -> PathBuf {
        self.path.join(format!("{service}.json"))
    }

    /// Writes `service`'s config file (whole or not at all: a temporary
    /// file renamed over it).
    pub fn write(&self, service: &str, json: &str) -> std::io::Result<()> {
        let file = self.file(service);
        let temporary = self.path.join(format!(".{service}.json.tmp"));
        std::fs::write(&temporary, json)?;
        std::fs::rename(&temporary, &file)?;
        self.seen_mut().insert(service.to_owned(), json.to_owned());
        Ok(())
    }

    /// Removes `service`'s config file, if there is one.
    pub fn remove(&self, service: &str) -> std::io::Result<()> {
        self.seen_mut().remove(service);
        match std::fs::remove_file(self.file(service)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn seen_mut(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The `<service>.json` files now in the directory and their text.
    fn read(&self) -> std::io::Result<HashMap<String, String>> {
        let mut files = HashMap::new();
        for entry in std::fs::read_dir(&self.path)? {
            let path = entry?.path();
            let Some(service) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .filter(|n| !n.starts_with('.'))
            else {
                continue;
            };
            if let Err(e) = validate::service_name(service) {
                tracing::warn!(file = %path.display(), error = %e, "service config file skipped: its name is no service name");
                continue;
            }
            match std::fs::read_to_string(&path) {
                Ok(text) => {
                    files.insert(service.to_owned(), text);
                }
                Err(e) => {
                    tracing::warn!(file = %path.display(), error = %e, "service config file unreadable")
                }
            }
        }
        Ok(files)
    }

    /// Applies what changed in the directory since the last look to
    /// `store`: new and changed files are set, removed files deleted.
    pub async fn sync(&self, store: &dyn Store) {
        let files = match self.read() {
            Ok(files) => files,
            Err(e) => {
                tracing::warn!(dir = %self.path.display(), error = %e, "service config directory unreadable");
                return;
            }
        };
        let seen = self.seen_mut().clone();
        for (service, text) in &files {
            if seen.get(service) == Some(text) {
                continue;
            }
            // Seen even when refused, so a bad file is logged once.
            self.seen_mut().insert(service.clone(), text.clone());
            match ServiceConfig::from_json(text) {
                Ok(config) => match store.set_config(service, &config).await {
                    Ok(version) => {
                        tracing::info!(%service, version, "service config loaded from its file")
                    }
                    Err(e) => {
                        tracing::warn!(%service, error = %e, "service config file not applied")
                    }
                },
                Err(e) => {
                    tracing::warn!(file = %self.file(service).display(), error = %e, "service config file refused; the config it would replace stays")
                }
            }
        }
        for service in seen.keys().filter(|s| !files.contains_key(*s)) {
            self.seen_mut().remove(service);
            match store.delete_config(service).await {
                Ok(_) => tracing::info!(%service, "service config removed with its file"),
                Err(e) => tracing::warn!(%service, error = %e, "service config not removed"),
            }
        }
    }

    /// Syncs now and then every [`POLL`], for as long as the task lives.
    pub async fn follow(self: Arc<Self>, store: Arc<dyn Store>) {
        loop {
            self.sync(&*store).await;
            tokio::time::sleep(POLL).await;
        }
    }
}
