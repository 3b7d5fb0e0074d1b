//! Tidy checks: the hand-kept documents against the code they describe, run by `cargo test` (and
//! by `scripts/test.sh`), so that a setting added without its README row, a test renamed away from
//! under ARCHITECTURE.md, or a source file without a module doc fails the build's tests.
//!
//! They read the repository's files at run time (never at compile time), so this binary compiles
//! in the flake's source too; it runs where the whole repository is, not in the Nix sandbox.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::CommandFactory;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(relative: &str) -> String {
    let path = root().join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// The backticked spans of `text`, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// `text` without its parenthesised asides (which name gRPC codes, examples, alternatives).
fn without_asides(text: &str) -> String {
    let mut depth = 0usize;
    text.chars()
        .filter(|&c| {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                _ => return depth == 0,
            }
            false
        })
        .collect()
}

fn is_variable(name: &str) -> bool {
    name.len() > 1
        && name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
}

/// A setting as a binary defines it: its variable and its default, if any.
#[derive(Debug, Clone, PartialEq)]
struct Setting {
    services: BTreeSet<&'static str>,
    default: Option<String>,
}

/// Every environment variable of both services' settings, from their clap definitions.
fn settings() -> BTreeMap<String, Setting> {
    let mut all: BTreeMap<String, Setting> = BTreeMap::new();
    for (service, command) in [
        ("websocket", websocket::Cli::command()),
        ("grpc_kafka", grpc_kafka::Cli::command()),
    ] {
        for arg in command.get_arguments() {
            let Some(env) = arg.get_env() else { continue };
            let default = arg
                .get_default_values()
                .first()
                .map(|v| v.to_string_lossy().into_owned());
            let entry = all
                .entry(env.to_string_lossy().into_owned())
                .or_insert_with(|| Setting {
                    services: BTreeSet::new(),
                    default: default.clone(),
                });
            entry.services.insert(service);
            assert_eq!(
                entry.default,
                default,
                "{}: the two services give it different defaults",
                env.to_string_lossy()
            );
        }
    }
    all
}

/// One row of README's configuration table: its variables, the service column, the defaults.
struct Row {
    line: String,
    variables: Vec<String>,
    service: String,
    defaults: Vec<String>,
}

fn readme_rows() -> Vec<Row> {
    let readme = read("README.md");
    let section = readme
        .split("\n## Configuration\n")
        .nth(1)
        .expect("README has a Configuration section");
    let section = section.split("\n## ").next().unwrap_or(section);
    section
        .lines()
        .filter(|line| line.starts_with("| `"))
        .map(|line| {
            let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
            assert_eq!(
                cells.len(),
                3,
                "README configuration row with {} cells: {line}",
                cells.len()
            );
            Row {
                line: line.to_owned(),
                variables: backticked(&without_asides(cells[0]))
                    .into_iter()
                    .filter(|name| is_variable(name))
                    .map(str::to_owned)
                    .collect(),
                // The first word: "both: the topic is created so; ..." is "both".
                service: cells[1]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_end_matches(':')
                    .to_owned(),
                defaults: backticked(&without_asides(cells[2]))
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
            }
        })
        .collect()
}

/// Variables README documents that no clap definition declares, each read elsewhere.
const READ_OUTSIDE_CLAP: [&str; 2] = ["RUST_LOG", "OTEL_EXPORTER_OTLP_ENDPOINT"];

#[test]
fn readme_configuration_table_matches_the_binaries_settings() {
    let settings = settings();
    let rows = readme_rows();
    let mut documented = BTreeSet::new();
    let mut problems = Vec::new();
    for row in &rows {
        for (index, name) in row.variables.iter().enumerate() {
            documented.insert(name.clone());
            if name
                .strip_suffix("_FILE")
                .is_some_and(|base| settings.contains_key(base))
            {
                continue; // DATABASE_URL_FILE and REDIS_URL_FILE: the secret-file form of a setting
            }
            if READ_OUTSIDE_CLAP.contains(&name.as_str()) {
                continue;
            }
            let Some(setting) = settings.get(name) else {
                problems.push(format!(
                    "README documents {name}, which no service reads: {}",
                    row.line
                ));
                continue;
            };
            let service = match setting.services.len() {
                2 => "both",
                _ => setting.services.first().copied().unwrap_or(""),
            };
            if row.service != service {
                problems.push(format!(
                    "{name}: README says {:?}, the settings say {service}",
                    row.service
                ));
            }
            match (&setting.default, row.defaults.get(index)) {
                (Some(default), Some(documented)) if default != documented => {
                    problems.push(format!(
                        "{name}: README's default is {documented:?}, the settings' is {default:?}"
                    ))
                }
                _ => {}
            }
        }
    }
    for name in settings.keys() {
        if !documented.contains(name) {
            problems.push(format!(
                "{name} is a setting with no row in README's configuration table"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "README's configuration table has drifted:\n{}",
        problems.join("\n")
    );
}

/// All the function names defined in a file.
fn functions(relative: &str) -> BTreeSet<String> {
    read(relative)
        .split("fn ")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            (!name.is_empty()).then_some(name)
        })
        .collect()
}

#[test]
fn every_test_architecture_names_exists() {
    let architecture = read("ARCHITECTURE.md");
    let files: BTreeMap<&str, &str> = [
        ("websocket", "tests/it/websocket.rs"),
        ("grpc_kafka", "tests/it/grpc_kafka.rs"),
        ("e2e", "tests/it/e2e.rs"),
        ("cluster", "tests/it/cluster.rs"),
        ("hostile", "tests/it/hostile.rs"),
        ("auth", "tests/it/auth.rs"),
        ("observability", "tests/it/observability.rs"),
        ("supervision", "tests/it/supervision.rs"),
        ("connection::tests", "crates/websocket/src/connection.rs"),
        ("store::tests", "crates/websocket/src/store.rs"),
        ("outbox::tests", "crates/websocket/src/outbox.rs"),
        ("handshake::tests", "crates/websocket/src/handshake.rs"),
        ("fitness::tests", "crates/kafka_common/src/fitness.rs"),
        ("supervise::tests", "crates/service_kit/src/supervise.rs"),
        ("totals::schema_tests", "crates/grpc_kafka/src/totals.rs"),
        ("faults", "tests/faults/main.rs"),
        ("hosts", "tests/faults/hosts.rs"),
        (
            "positions::tests",
            "crates/grpc_kafka/src/positions/tests.rs",
        ),
        ("properties", "crates/purchase/tests/properties.rs"),
    ]
    .into_iter()
    .collect();
    let mut named = 0;
    let mut missing = Vec::new();
    for span in backticked(&architecture) {
        let Some((module, name)) = span.rsplit_once("::") else {
            continue;
        };
        if module == "purchase" {
            // A module of the domain crate, not a test.
            if !root()
                .join(format!("crates/purchase/src/{name}.rs"))
                .exists()
            {
                missing.push(span.to_owned());
            }
            continue;
        }
        let Some(file) = files.get(module) else {
            continue;
        };
        named += 1;
        if !functions(file).contains(name) {
            missing.push(format!("{span} (no fn {name} in {file})"));
        }
    }
    assert!(
        named > 30,
        "only {named} tests named in ARCHITECTURE.md: is the pattern still right?"
    );
    assert!(
        missing.is_empty(),
        "ARCHITECTURE.md names tests that do not exist:\n{}",
        missing.join("\n")
    );
}

fn rust_files(dir: &Path, found: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            if path
                .file_name()
                .is_some_and(|n| n == "node_modules" || n == "target")
            {
                continue;
            }
            rust_files(&path, found);
        } else if path.extension().is_some_and(|e| e == "rs") {
            found.push(path);
        }
    }
}

#[test]
fn every_source_file_opens_with_a_module_doc() {
    let mut files = Vec::new();
    rust_files(&root().join("crates"), &mut files);
    rust_files(&root().join("tests"), &mut files);
    assert!(files.len() > 40, "only {} Rust files found", files.len());
    let undocumented: Vec<String> = files
        .iter()
        .filter(|path| {
            !std::fs::read_to_string(path)
                .expect("read source")
                .starts_with("//!")
        })
        .map(|path| path.display().to_string())
        .collect();
    assert!(
        undocumented.is_empty(),
        "files without a module doc (//! on the first line):\n{}",
        undocumented.join("\n")
    );
}

/// README's metrics table: (name without labels, type) per row.
fn readme_metrics() -> BTreeMap<String, String> {
    let readme = read("README.md");
    let section = readme
        .split("| metric | type | meaning |")
        .nth(1)
        .expect("README has the metrics table");
    let mut rows = BTreeMap::new();
    for line in section.lines().skip(2) {
        if !line.starts_with("| `") {
            break;
        }
        let cells: Vec<&str> = line.trim_matches('|').split(" | ").collect();
        for name in backticked(cells[0]) {
            let name = name.split('{').next().unwrap_or(name);
            rows.insert(name.to_owned(), cells[1].trim().to_owned());
        }
    }
    rows
}

/// Every metric both services render before anything happened, as a scrape shows it: (name,
/// type). Labelled families appear only once they have a sample, so they are not here.
fn registered_metrics() -> BTreeMap<String, String> {
    let mut found = BTreeMap::new();
    for text in [
        websocket::metrics::Metrics::default().render(),
        grpc_kafka::metrics::Metrics::default().render(),
    ] {
        for line in text.lines() {
            let Some(rest) = line.strip_prefix("# TYPE ") else {
                continue;
            };
            let (name, kind) = rest.split_once(' ').expect("# TYPE name type");
            found.insert(name.to_owned(), kind.to_owned());
        }
    }
    found
}

#[test]
fn readme_metrics_table_matches_the_registries() {
    let documented = readme_metrics();
    let registered = registered_metrics();
    assert!(
        registered.len() > 15,
        "only {} metrics registered: is the pattern still right?",
        registered.len()
    );
    let mut problems = Vec::new();
    for (name, kind) in &registered {
        match documented.get(name) {
            None => problems.push(format!(
                "{name} ({kind}) is registered but has no row in README's metrics table"
            )),
            Some(row) if row != kind => problems.push(format!(
                "{name}: README says {row}, the registry says {kind}"
            )),
            Some(_) => {}
        }
    }
    // A labelled family renders nothing until its first sample: a documented metric that is not
    // rendered must at least be registered by that name (without `_total` and its unit).
    let sources = [
        read("crates/websocket/src/metrics.rs"),
        read("crates/grpc_kafka/src/metrics.rs"),
        read("crates/telemetry/src/lib.rs"),
    ]
    .concat();
    for name in documented.keys() {
        let base = name.strip_suffix("_total").unwrap_or(name);
        let base = base.strip_suffix("_seconds").unwrap_or(base);
        if !registered.contains_key(name) && !sources.contains(&format!("\"{base}\"")) {
            problems.push(format!(
                "README documents {name}, which no service registers"
            ));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
