//! The SQL both backends share, one file per store trait, each a macro expanded by
//! `impl_shared_store!` for each backend: SQLite and PostgreSQL take the same portable
//! statements, and what differs (connection, migrations, the claim's locking, byte counts) each
//! backend writes itself (`claim_in_store`, `begin_read`, `log_byte_stats`, `write_turn`,
//! `log_write_turn`).

#[macro_use]
mod engine;
#[macro_use]
mod instances;
#[macro_use]
mod logs;
#[macro_use]
mod runs;

/// Every store trait for backend `$store` over sqlx database `$db`.
macro_rules! impl_shared_store {
    ($store:ident, $db:ty) => {
        shared_runs!($store, $db);
        shared_logs!($store, $db);
        shared_engine!($store, $db);
        shared_instances!($store, $db);

        #[async_trait::async_trait]
        impl $crate::Store for $store {
            async fn close(&self) {
                self.pool.close().await;
            }
        }
    };
}
