//! Long-lived tasks under supervision.
//!
//! A service spawns each of its long-lived tasks (accept loops, writers, relays, consumers,
//! followers) on one [`Tasks`], by name. `run_until_stopped` waits on
//! [`Tasks::first_ended`] beside the shutdown signal: a task that ends while the service should
//! run, whether it returned, failed or panicked, is a [`TaskEnded`] that turns the service
//! not-ready and makes the process exit non-zero. At shutdown the service stops its tasks in its
//! own order and waits for each with [`Tasks::join`].
//!
//! [`KillSwitch`] aborts a task by name from outside: the fault-injection hook the tests use to
//! show that every task is supervised.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use tokio::task::{AbortHandle, JoinError, JoinHandle};

/// Any error a task may end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a long-lived task is no longer running.
#[derive(Debug, thiserror::Error)]
pub enum TaskEnded {
    #[error("the {task} ended while the service should run")]
    Returned { task: &'static str },
    #[error("the {task} failed: {source}")]
    Failed {
        task: &'static str,
        #[source]
        source: BoxError,
    },
    #[error("the {task} panicked: {message}")]
    Panicked { task: &'static str, message: String },
    #[error("the {task} was aborted")]
    Aborted { task: &'static str },
}

impl TaskEnded {
    /// The name the task was spawned with.
    pub fn task(&self) -> &'static str {
        match self {
            Self::Returned { task }
            | Self::Failed { task, .. }
            | Self::Panicked { task, .. }
            | Self::Aborted { task } => task,
        }
    }

    fn of(task: &'static str, joined: Result<Result<(), BoxError>, JoinError>) -> Self {
        match joined {
            Ok(Ok(())) => Self::Returned { task },
            Ok(Err(source)) => Self::Failed { task, source },
            Err(join) if join.is_cancelled() => Self::Aborted { task },
            Err(join) => Self::Panicked {
                task,
                message: join.to_string(),
            },
        }
    }
}

/// An error and its sources, `outer: inner: innermost`, for one log field.
pub fn cause_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut chain = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        // thiserror's `{0}` display repeats the source; say each cause once.
        if !chain.ends_with(&text) {
            chain.push_str(": ");
            chain.push_str(&text);
        }
        source = cause.source();
    }
    chain
}

/// Aborts supervised tasks by name: fault injection for tests.
#[derive(Clone, Default)]
pub struct KillSwitch(Arc<Mutex<HashMap<&'static str, AbortHandle>>>);

impl std::fmt::Debug for KillSwitch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("KillSwitch").field(&self.names()).finish()
    }
}

impl KillSwitch {
    /// The names of the tasks spawned so far, sorted.
    pub fn names(&self) -> Vec<&'static str> {
        let mut names: Vec<_> = self.handles().keys().copied().collect();
        names.sort_unstable();
        names
    }

    /// Aborts the task `name`; false when no task of that name was spawned.
    pub fn abort(&self, name: &str) -> bool {
        self.handles().get(name).map(AbortHandle::abort).is_some()
    }

    fn handles(&self) -> std::sync::MutexGuard<'_, HashMap<&'static str, AbortHandle>> {
        // A panic while holding this lock cannot leave the map half-written.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The long-lived tasks of one service run.
#[derive(Debug, Default)]
pub struct Tasks {
    running: Vec<(&'static str, JoinHandle<Result<(), BoxError>>)>,
    kill_switch: KillSwitch,
}

impl Tasks {
    /// Tasks whose abort handles are registered with `kill_switch`.
    pub fn new(kill_switch: KillSwitch) -> Self {
        Self {
            running: Vec::new(),
            kill_switch,
        }
    }

    /// Spawns `task` under `name` (unique within the service).
    pub fn spawn<F, E>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        let handle = tokio::spawn(async move { task.await.map_err(Into::into) });
        self.kill_switch
            .handles()
            .insert(name, handle.abort_handle());
        self.running.push((name, handle));
    }

    /// Spawns a task that has no error of its own to report.
    pub fn spawn_infallible<F>(&mut self, name: &'static str, task: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        self.spawn(name, async move {
            task.await;
            Ok::<(), std::convert::Infallible>(())
        });
    }

    /// Resolves when the first of the running tasks ends, and removes it; never while none runs.
    pub async fn first_ended(&mut self) -> TaskEnded {
        if self.running.is_empty() {
            return std::future::pending().await;
        }
        let handles = self.running.iter_mut().map(|(_, handle)| handle);
        let (joined, index, _) = futures_util::future::select_all(handles).await;
        let (name, _) = self.running.swap_remove(index);
        TaskEnded::of(name, joined)
    }

    /// At shutdown: waits for the task `name` until `deadline`, and logs how it ended unless it
    /// returned. Returns false when it is still running at the deadline.
    pub async fn join(&mut self, name: &'static str, deadline: tokio::time::Instant) -> bool {
        let Some(index) = self.running.iter().position(|(task, _)| *task == name) else {
            return true;
        };
        let (_, handle) = self.running.swap_remove(index);
        match tokio::time::timeout_at(deadline, handle).await {
            Err(_) => {
                tracing::warn!(task = name, "still running at the shutdown deadline");
                false
            }
            Ok(Ok(Ok(()))) => true,
            Ok(joined) => {
                let ended = TaskEnded::of(name, joined);
                tracing::error!(task = name, error = %cause_chain(&ended), "ended badly while stopping");
                true
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn a_cause_chain_names_every_source_once() {
        let error = Outer(std::io::Error::other("inner"));
        assert_eq!(cause_chain(&error), "outer: inner");
        let ended = TaskEnded::Failed {
            task: "relay",
            source: Box::new(error),
        };
        assert_eq!(cause_chain(&ended), "the relay failed: outer: inner");
    }

    #[tokio::test]
    async fn the_first_task_to_end_is_reported_with_how_it_ended() {
        let switch = KillSwitch::default();
        let mut tasks = Tasks::new(switch.clone());
        tasks.spawn_infallible("forever", std::future::pending());
        tasks.spawn("failing", async { Err(std::io::Error::other("boom")) });
        let ended = tasks.first_ended().await;
        assert!(
            matches!(
                ended,
                TaskEnded::Failed {
                    task: "failing",
                    ..
                }
            ),
            "{ended:?}"
        );
        assert_eq!(switch.names(), ["failing", "forever"]);
        assert!(switch.abort("forever"));
        assert!(!switch.abort("unknown"));
        let ended = tasks.first_ended().await;
        assert!(
            matches!(ended, TaskEnded::Aborted { task: "forever" }),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn a_task_that_returns_or_panics_is_an_end_too() {
        let mut tasks = Tasks::default();
        tasks.spawn_infallible("returning", async {});
        assert!(matches!(
            tasks.first_ended().await,
            TaskEnded::Returned { task: "returning" }
        ));
        tasks.spawn_infallible("panicking", async { panic!("on purpose") });
        let ended = tasks.first_ended().await;
        assert!(
            matches!(&ended, TaskEnded::Panicked { task: "panicking", message } if message.contains("on purpose")),
            "{ended:?}"
        );
    }

    #[tokio::test]
    async fn join_waits_for_the_named_task_until_the_deadline() {
        let mut tasks = Tasks::default();
        tasks.spawn_infallible("forever", std::future::pending());
        tasks.spawn_infallible("quick", async {});
        let soon = tokio::time::Instant::now() + std::time::Duration::from_millis(20);
        assert!(tasks.join("quick", soon).await);
        assert!(!tasks.join("forever", soon).await);
        assert!(tasks.join("never spawned", soon).await);
    }
}
