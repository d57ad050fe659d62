//! The route table of accounts, keys, money and usage under `/api`, merged into the app
//! by `crate::router`.

use axum::routing::{get, post};
use axum::Router;
use std::sync::Arc;

use crate::routes::{admin_credits, admin_keys, admin_prices, auth, keys, sessions, usage};
use crate::state::AppState;

pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/auth/register", post(auth::register))
        .route("/api/auth/login", post(auth::login))
        .route("/api/me", get(auth::me))
        .route(
            "/api/me/password",
            axum::routing::put(auth::change_password).post(auth::change_password),
        )
        .route("/api/keys", get(keys::list_own).post(keys::create_own))
        .route(
            "/api/keys/{id}",
            get(keys::get_own)
                .patch(keys::update_own)
                .delete(keys::revoke_own),
        )
        .route("/api/usage", get(usage::own))
        .route("/api/sessions", get(sessions::list).post(sessions::create))
        .route(
            "/api/sessions/{id}",
            get(sessions::get)
                .patch(sessions::rename)
                .delete(sessions::delete),
        )
        .route("/api/sessions/{id}/messages", get(sessions::messages))
        .route("/api/sessions/{id}/chat", post(sessions::chat))
        .route("/api/sessions/{id}/regenerate", post(sessions::regenerate))
        .route("/api/sessions/{id}/usage", get(sessions::usage))
        .route("/api/prices", get(admin_prices::current))
        .route("/api/redeem", post(admin_credits::redeem))
        .route(
            "/api/admin/keys",
            get(admin_keys::list).post(admin_keys::create),
        )
        .route(
            "/api/admin/keys/{id}",
            get(admin_keys::get)
                .patch(admin_keys::update)
                .delete(admin_keys::revoke),
        )
        .route(
            "/api/admin/users",
            get(admin_keys::list_users).post(admin_keys::create_user_route),
        )
        .route(
            "/api/admin/users/{id}",
            axum::routing::patch(admin_keys::update_user),
        )
        .route(
            "/api/admin/prices",
            get(admin_prices::list)
                .put(admin_prices::set)
                .post(admin_prices::set),
        )
        .route("/api/admin/credits", post(admin_credits::grant))
        .route(
            "/api/admin/redemption-codes",
            post(admin_credits::mint_codes),
        )
        .route("/api/admin/usage", get(usage::admin))
        .route("/api/me/balance", get(usage::own_balance))
        .route(
            "/api/me/plan",
            get(crate::routes::plans::mine).delete(crate::routes::plans::leave),
        )
        .route("/api/plans", get(crate::routes::plans::offered))
        .route(
            "/api/plans/{id}/subscribe",
            post(crate::routes::plans::subscribe),
        )
        .route(
            "/api/admin/plans",
            get(crate::routes::plans::list).post(crate::routes::plans::create),
        )
        .route(
            "/api/admin/plans/{id}",
            get(crate::routes::plans::get).patch(crate::routes::plans::update),
        )
        .route(
            "/api/admin/users/{id}/plan",
            get(crate::routes::plans::user_status).put(crate::routes::plans::assign),
        )
        .route("/api/admin/users/{id}/balance", get(usage::user_balance))
}
