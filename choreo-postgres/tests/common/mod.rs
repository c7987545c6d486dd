//! What the Postgres handler tests share: the shop's two events and a pool
//! on a database with the `charges` table the handlers write.
#![allow(dead_code, missing_docs, unreachable_pub, clippy::unwrap_used)]

use choreo::event;
use choreo_postgres::sqlx::postgres::PgPoolOptions;
use choreo_postgres::sqlx::{self, PgPool};

#[event(subject = "orders.{order_id}.placed")]
#[derive(Clone, Debug)]
pub struct OrderPlaced {
    pub order_id: String,
    pub cents: i64,
}

#[event(subject = "payments.{order_id}.captured")]
#[derive(Clone, Debug)]
pub struct PaymentCaptured {
    pub order_id: String,
}

/// A pool on `url`, with the `charges` table created.
pub async fn pool(url: &str) -> PgPool {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect(url)
        .await
        .unwrap();
    sqlx::query(
        "CREATE TABLE IF NOT EXISTS charges (order_id text NOT NULL, cents bigint NOT NULL)",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool
}
