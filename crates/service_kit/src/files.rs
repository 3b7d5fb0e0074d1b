//! What the services read from files and flags that may hold secrets: `*_FILE` secrets (the
//! Docker convention), connection URLs parsed without ever echoing them, and the PEM files of a
//! TLS listener.

/// A clap value parser for settings that may hold credentials (connection URLs): a rejection
/// names the setting and the reason, never the value, so a password cannot end up in a log.
#[derive(Clone)]
pub struct SecretParser<T> {
    name: &'static str,
    parse: fn(&str) -> Result<T, String>,
}

impl<T> SecretParser<T> {
    pub fn new(name: &'static str, parse: fn(&str) -> Result<T, String>) -> Self {
        Self { name, parse }
    }
}

impl<T: Clone + Send + Sync + 'static> clap::builder::TypedValueParser for SecretParser<T> {
    type Value = T;

    fn parse_ref(
        &self,
        _command: &clap::Command,
        _arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<T, clap::Error> {
        let invalid = |why: String| {
            clap::Error::raw(
                clap::error::ErrorKind::ValueValidation,
                format!(
                    "invalid {}: {why} (the value is not shown: it may hold a password)\n",
                    self.name
                ),
            )
        };
        let text = value
            .to_str()
            .ok_or_else(|| invalid("not valid UTF-8".to_owned()))?;
        (self.parse)(text).map_err(invalid)
    }
}

/// Optional TLS for a service's listener: a PEM certificate chain and its PEM private key.
#[derive(Debug, Clone, clap::Args)]
pub struct TlsSettings {
    /// PEM certificate chain of this listener; with TLS_KEY_FILE turns TLS on (wss:// or
    /// https:// gRPC). Both or neither.
    #[arg(long, env = "TLS_CERT_FILE", requires = "tls_key_file")]
    pub tls_cert_file: Option<std::path::PathBuf>,
    /// PEM private key of TLS_CERT_FILE.
    #[arg(long, env = "TLS_KEY_FILE", requires = "tls_cert_file")]
    pub tls_key_file: Option<std::path::PathBuf>,
}

/// The PEM texts of a listener's certificate chain and key.
#[derive(Clone)]
pub struct TlsPem {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
}

impl std::fmt::Debug for TlsPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TlsPem { .. }")
    }
}

impl TlsSettings {
    /// Reads both files when TLS is on; None when it is off.
    pub fn read(&self) -> Result<Option<TlsPem>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) else {
            return Ok(None);
        };
        let read = |name: &str, path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {name} {}: {e}", path.display()))
        };
        Ok(Some(TlsPem {
            cert: read("TLS_CERT_FILE", cert)?,
            key: read("TLS_KEY_FILE", key)?,
        }))
    }
}

/// The process arguments, plus `--flag=<contents>` for each `NAME_FILE` variable that is set
/// (the Docker secrets convention: `DATABASE_URL_FILE=/run/secrets/database_url`). The value
/// stays in this process's memory: it is never on a command line, in the environment or in a log.
/// Setting both `NAME` and `NAME_FILE` is refused, as is an unreadable file. Trailing newlines
/// of the file are dropped.
pub fn args_with_secret_files(secrets: &[(&str, &str)]) -> Result<Vec<std::ffi::OsString>, String> {
    let mut args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    for (name, flag) in secrets {
        let file_var = format!("{name}_FILE");
        let Some(path) = std::env::var_os(&file_var) else {
            continue;
        };
        if std::env::var_os(name).is_some() {
            return Err(format!("set {name} or {file_var}, not both"));
        }
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "cannot read {file_var} {}: {e}",
                std::path::Path::new(&path).display()
            )
        })?;
        args.insert(
            1,
            format!("{flag}={}", text.trim_end_matches(['\n', '\r'])).into(),
        );
    }
    Ok(args)
}
