//! `sluice <role>`: one binary, each role a subcommand. This file only parses the
//! command line, sets up logging and a shutdown token, and hands over to `roles`.

mod admin;
mod audit;
mod events_cmd;
mod local_services;
mod node;
mod replay;
mod roles;
mod seed;
mod settings;
mod telemetry;
mod up;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "An LLM API gateway built as an event-sourced pipeline"
)]
struct Cli {
    #[command(subcommand)]
    role: Role,
}

#[derive(Subcommand)]
enum Role {
    /// Everything in one process; starts local NATS/Postgres/Redis when none are reachable.
    Up,
    /// The HTTP API (OpenAI-compatible) on SLUICE_LISTEN.
    Ingress,
    /// Takes queued requests, calls upstream channels, publishes chunks and events.
    Worker {
        /// Upstream calls in flight at once in this process.
        #[arg(long, default_value_t = 256)]
        max_in_flight: usize,
    },
    /// Appends JetStream events to the Postgres event log (one active at a time).
    Journal,
    /// Runs the billing projector (ledger, balances, daily usage).
    Billing,
    /// Runs the non-money projectors (per-request summaries, conversations).
    Projector,
    /// Applies migrations and upserts the channels, keys and prices of sluice.yaml.
    Migrate,
    /// A fake provider speaking OpenAI's wire format, for tests and benchmarks.
    MockUpstream(roles::MockArgs),
    /// A remote worker node: serves models from a local provider to the gateway over NATS.
    Node(node::NodeArgs),
    /// Runs a projector over the event log into a scratch schema (or rebuilds it in place),
    /// optionally re-pricing history under another price table.
    Replay(replay::ReplayArgs),
    /// Rebuilds billing from the log and compares it with the live read model; exits
    /// non-zero on any difference.
    Audit(audit::AuditArgs),
    /// The raw event log: `tail` (live, JetStream), `export` (Postgres, JSON lines or CSV),
    /// `synth` (synthetic events for benchmarks).
    Events(events_cmd::EventsArgs),
    /// Operator commands, e.g. `sluice admin create-user --name root` (the first admin).
    Admin(admin::AdminArgs),
    /// Exits 0 when this container's role answers `/healthz` (for container health checks).
    Healthcheck(telemetry::HealthcheckArgs),
}

/// One token for the whole process, cancelled on SIGINT or SIGTERM.
fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(_) => {
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {}
                _ = term.recv() => {}
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    telemetry::init_tracing();
    telemetry::init_metrics();
    let shutdown = shutdown_token();
    let result = match cli.role {
        Role::MockUpstream(args) => roles::mock_upstream(args, shutdown).await,
        Role::Healthcheck(args) => telemetry::healthcheck(args).await,
        // A node reads node.yaml, not sluice.yaml, and needs nothing but NATS.
        Role::Node(args) => node::run(args, shutdown).await,
        role => match settings::Settings::load() {
            Err(e) => Err(e),
            Ok(settings) => match role {
                Role::Up => up::run(settings, shutdown).await,
                Role::Ingress => roles::ingress(&settings, shutdown).await,
                Role::Worker { max_in_flight } => {
                    roles::worker(&settings, max_in_flight, shutdown).await
                }
                Role::Journal => roles::journal(&settings, shutdown).await,
                Role::Billing => roles::billing(&settings, shutdown).await,
                Role::Projector => roles::projector(&settings, shutdown).await,
                Role::Migrate => roles::migrate(&settings).await,
                Role::Replay(args) => replay::run(&settings, args, shutdown).await,
                Role::Audit(args) => audit::run(&settings, args, shutdown).await,
                Role::Events(args) => events_cmd::run(&settings, args, shutdown).await,
                Role::Admin(args) => admin::run(&settings, args).await,
                Role::MockUpstream(_) | Role::Node(_) | Role::Healthcheck(_) => Ok(()),
            },
        },
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("sluice: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
