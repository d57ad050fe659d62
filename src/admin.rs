//! `sluice admin …`: operator commands that act on the database directly, e.g. creating
//! the first admin user before anyone can log in.

use anyhow::Context as _;
use clap::{Args, Subcommand};
use std::io::BufRead as _;

use ingress::accounts::{create_user, NewUser, Role};

use crate::settings::Settings;

#[derive(Args)]
pub struct AdminArgs {
    #[command(subcommand)]
    command: AdminCommand,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Creates a user. The password is read from SLUICE_ADMIN_PASSWORD, or else from the
    /// first line of stdin, so it never appears in the process list or shell history.
    CreateUser {
        #[arg(long)]
        name: String,
        #[arg(long)]
        email: Option<String>,
        /// `admin` or `user`.
        #[arg(long, default_value = "admin")]
        role: String,
        #[arg(long, default_value = "default")]
        group: String,
    },
}

pub async fn run(settings: &Settings, args: AdminArgs) -> anyhow::Result<()> {
    match args.command {
        AdminCommand::CreateUser {
            name,
            email,
            role,
            group,
        } => {
            let role = Role::parse(&role)?;
            let password = match std::env::var("SLUICE_ADMIN_PASSWORD") {
                Ok(p) if !p.is_empty() => p,
                _ => {
                    let mut line = String::new();
                    std::io::stdin()
                        .lock()
                        .read_line(&mut line)
                        .context("reading the password from stdin")?;
                    line.trim_end_matches(['\r', '\n']).to_owned()
                }
            };
            let pool = crate::roles::pool(settings, 2, true).await?;
            let client = crate::roles::nats(settings, "admin").await?;
            let js = async_nats::jetstream::new(client.clone());
            let user = create_user(
                &pool,
                &js,
                &settings.namespace,
                NewUser {
                    name,
                    email,
                    password: Some(password),
                    role,
                    group,
                    source: "cli",
                },
            )
            .await?;
            client.flush().await.ok();
            tracing::info!(user_id = %user.id, role = %user.role, "user created");
            eprintln!("created {} user `{}` ({})", user.role, user.name, user.id);
            Ok(())
        }
    }
}

/// The secret signing `/api` session tokens: `SLUICE_JWT_SECRET`, or else one derived from
/// `SLUICE_SECRET_KEY` (so a zero-config `sluice up`, which generates that key, can sign
/// in, and every ingress of a deployment derives the same one). Neither set: sign-in is off.
pub fn jwt_secret(settings: &Settings) -> Option<String> {
    match std::env::var("SLUICE_JWT_SECRET") {
        Ok(s) if !s.is_empty() => Some(s),
        _ => settings
            .secret_key
            .as_ref()
            .map(|k| ingress::hash_key(&format!("sluice-jwt:{}", k.expose()))),
    }
}
