//! The dashboard's tables: admins, sessions, the setup token, wizard progress.

use ipnet::Ipv4Net;
use sqlx::FromRow;
use trellis_proto::validate_name;

use crate::audit::{self, action};
use crate::store::{
    hash_secret, new_secret, validate_cidr, Account, Store, StoreError, StoreResult,
};

/// How long a session lasts from login.
pub const SESSION_TTL_SECS: i64 = 7 * 24 * 3600;

/// A dashboard admin (without the password hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminUser {
    pub id: i64,
    pub account_id: i64,
    pub email: String,
}

/// A live session, looked up by its cookie.
#[derive(Debug, Clone)]
pub struct SessionRow {
    pub admin: AdminUser,
    pub account: Account,
    pub csrf: String,
}

/// The wizard's progress for one account.
#[derive(Debug, Clone, Copy, Default)]
pub struct Wizard {
    pub network_named: bool,
    pub done: bool,
}

/// Lower-cases and trims an email; checks it looks like one.
pub fn normalize_email(raw: &str) -> Result<String, String> {
    let email = raw.trim().to_lowercase();
    let valid = email.len() <= 254
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
        && email.split_once('@').is_some_and(|(user, host)| {
            !user.is_empty() && !host.is_empty() && !host.contains('@')
        });
    if !valid {
        return Err(format!(
            "{:?} is not an email address; enter one like alex@example.com",
            raw.trim()
        ));
    }
    Ok(email)
}

/// Checks a new password: 10 to 1024 characters.
pub fn check_password(password: &str) -> Result<(), String> {
    let n = password.chars().count();
    if n < 10 {
        return Err(format!(
            "the password is {n} characters long; use at least 10 (a few words make a good one)"
        ));
    }
    if password.len() > 1024 {
        return Err("the password is longer than 1024 bytes; use a shorter one".into());
    }
    Ok(())
}

impl Store {
    /// Whether any dashboard admin exists.
    pub async fn dashboard_admin_exists(&self) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dashboard_admins")
            .fetch_one(&self.pool)
            .await?;
        Ok(n > 0)
    }

    /// While no admin exists: replaces the setup token with a fresh one and
    /// returns it (plaintext, to print). Once an admin exists: None.
    pub async fn renew_setup_token(&self, now: i64) -> StoreResult<Option<String>> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dashboard_admins")
            .fetch_one(&mut *tx)
            .await?;
        if n > 0 {
            sqlx::query("DELETE FROM dashboard_setup")
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            return Ok(None);
        }
        let token = new_secret("trs_");
        sqlx::query(
            "INSERT OR REPLACE INTO dashboard_setup (id, token_hash, created_at) VALUES (1, ?, ?)",
        )
        .bind(hash_secret(&token))
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(token))
    }

    /// Whether `token` is the current setup token (and no admin exists yet).
    pub async fn setup_token_valid(&self, token: &str) -> StoreResult<bool> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM dashboard_setup WHERE id = 1 AND token_hash = ? \
             AND NOT EXISTS (SELECT 1 FROM dashboard_admins)",
        )
        .bind(hash_secret(token.trim()))
        .fetch_one(&self.pool)
        .await?;
        Ok(n == 1)
    }

    /// Creates the first admin with the setup token (for the oldest account,
    /// the one made on first start), using the token up. `password_hash` is
    /// the argon2 PHC string.
    pub async fn create_first_admin(
        &self,
        token: &str,
        email: &str,
        password_hash: &str,
        now: i64,
    ) -> StoreResult<AdminUser> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let admins: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dashboard_admins")
            .fetch_one(&mut *tx)
            .await?;
        let matches: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM dashboard_setup WHERE id = 1 AND token_hash = ?",
        )
        .bind(hash_secret(token.trim()))
        .fetch_one(&mut *tx)
        .await?;
        if admins > 0 || matches == 0 {
            return Err(StoreError::Forbidden(
                "this setup link was already used or is out of date; log in instead, or restart the server for a fresh link while no admin exists".into(),
            ));
        }
        let account_id: i64 = sqlx::query_scalar("SELECT id FROM accounts ORDER BY id LIMIT 1")
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::Corrupt("no account exists".into()))?;
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO dashboard_admins (account_id, email, password_hash, created_at) \
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(account_id)
        .bind(email)
        .bind(password_hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        sqlx::query("DELETE FROM dashboard_setup")
            .execute(&mut *tx)
            .await?;
        audit::record(
            &mut tx,
            account_id,
            "setup",
            action::ADMIN_CREATE,
            email,
            "first admin, with the setup link",
        )
        .await?;
        tx.commit().await?;
        Ok(AdminUser {
            id,
            account_id,
            email: email.to_string(),
        })
    }

    /// Adds a dashboard admin to `account` (through the API).
    pub async fn create_admin(
        &self,
        account: &Account,
        email: &str,
        password_hash: &str,
        now: i64,
        actor: &str,
    ) -> StoreResult<AdminUser> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let taken: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM dashboard_admins WHERE email = ?")
                .bind(email)
                .fetch_one(&mut *tx)
                .await?;
        if taken > 0 {
            return Err(StoreError::Conflict(format!(
                "an admin with email {email:?} already exists"
            )));
        }
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO dashboard_admins (account_id, email, password_hash, created_at) \
             VALUES (?, ?, ?, ?) RETURNING id",
        )
        .bind(account.id)
        .bind(email)
        .bind(password_hash)
        .bind(now)
        .fetch_one(&mut *tx)
        .await?;
        // Whoever made this admin got through setup already.
        sqlx::query("DELETE FROM dashboard_setup")
            .execute(&mut *tx)
            .await?;
        audit::record(&mut tx, account.id, actor, action::ADMIN_CREATE, email, "").await?;
        tx.commit().await?;
        Ok(AdminUser {
            id,
            account_id: account.id,
            email: email.to_string(),
        })
    }

    /// The admin with this email and their password hash.
    pub async fn admin_by_email(&self, email: &str) -> StoreResult<Option<(AdminUser, String)>> {
        #[derive(FromRow)]
        struct Row {
            id: i64,
            account_id: i64,
            email: String,
            password_hash: String,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT id, account_id, email, password_hash FROM dashboard_admins WHERE email = ?",
        )
        .bind(email)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map(|r| {
            (
                AdminUser {
                    id: r.id,
                    account_id: r.account_id,
                    email: r.email,
                },
                r.password_hash,
            )
        }))
    }

    /// Starts a session for `admin`; returns (session id, csrf token), both plaintext.
    pub async fn create_session(&self, admin_id: i64, now: i64) -> StoreResult<(String, String)> {
        let sid = new_secret("");
        let csrf = new_secret("");
        sqlx::query(
            "INSERT INTO dashboard_sessions (id_hash, admin_id, csrf, created_at, expires_at) \
             VALUES (?, ?, ?, ?, ?)",
        )
        .bind(hash_secret(&sid))
        .bind(admin_id)
        .bind(&csrf)
        .bind(now)
        .bind(now + SESSION_TTL_SECS)
        .execute(&self.pool)
        .await?;
        // Forget expired sessions now and then (here: at every login).
        sqlx::query("DELETE FROM dashboard_sessions WHERE expires_at <= ?")
            .bind(now)
            .execute(&self.pool)
            .await?;
        Ok((sid, csrf))
    }

    /// The unexpired session with this id, its admin and account.
    pub async fn session(&self, sid: &str, now: i64) -> StoreResult<Option<SessionRow>> {
        #[derive(FromRow)]
        struct Row {
            admin_id: i64,
            email: String,
            csrf: String,
            account_id: i64,
        }
        let row: Option<Row> = sqlx::query_as(
            "SELECT s.admin_id, a.email, s.csrf, a.account_id FROM dashboard_sessions s \
             JOIN dashboard_admins a ON a.id = s.admin_id \
             WHERE s.id_hash = ? AND s.expires_at > ?",
        )
        .bind(hash_secret(sid))
        .bind(now)
        .fetch_optional(&self.pool)
        .await?;
        let Some(r) = row else { return Ok(None) };
        let Some(account) = self.account_by_id(r.account_id).await? else {
            return Ok(None);
        };
        Ok(Some(SessionRow {
            admin: AdminUser {
                id: r.admin_id,
                account_id: r.account_id,
                email: r.email,
            },
            account,
            csrf: r.csrf,
        }))
    }

    /// Ends one session.
    pub async fn delete_session(&self, sid: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM dashboard_sessions WHERE id_hash = ?")
            .bind(hash_secret(sid))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Ends every session of an admin; returns how many there were.
    pub async fn delete_admin_sessions(&self, admin_id: i64) -> StoreResult<u64> {
        let done = sqlx::query("DELETE FROM dashboard_sessions WHERE admin_id = ?")
            .bind(admin_id)
            .execute(&self.pool)
            .await?;
        Ok(done.rows_affected())
    }

    /// The wizard's progress for `account_id`.
    pub async fn wizard(&self, account_id: i64) -> StoreResult<Wizard> {
        let row: Option<(Option<i64>, Option<i64>)> = sqlx::query_as(
            "SELECT network_named_at, done_at FROM dashboard_wizard WHERE account_id = ?",
        )
        .bind(account_id)
        .fetch_optional(&self.pool)
        .await?;
        Ok(row.map_or_else(Wizard::default, |(named, done)| Wizard {
            network_named: named.is_some(),
            done: done.is_some(),
        }))
    }

    /// Marks the wizard finished for `account_id`.
    pub async fn wizard_done(&self, account_id: i64, now: i64) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO dashboard_wizard (account_id, done_at) VALUES (?, ?) \
             ON CONFLICT(account_id) DO UPDATE SET done_at = COALESCE(done_at, excluded.done_at)",
        )
        .bind(account_id)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Names the network (wizard step 2): renames the account and optionally
    /// changes its address block, both only while it has no nodes.
    pub async fn name_network(
        &self,
        account: &Account,
        name: &str,
        cidr: Option<Ipv4Net>,
        now: i64,
        actor: &str,
    ) -> StoreResult<Account> {
        validate_name("network", name).map_err(StoreError::Invalid)?;
        if let Some(c) = &cidr {
            validate_cidr(c).map_err(StoreError::Invalid)?;
        }
        let new_cidr = cidr.unwrap_or(account.cidr);
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let current: Option<(String, String)> =
            sqlx::query_as("SELECT name, cidr FROM accounts WHERE id = ?")
                .bind(account.id)
                .fetch_optional(&mut *tx)
                .await?;
        let Some((old_name, old_cidr)) = current else {
            return Err(StoreError::NotFound("this network no longer exists".into()));
        };
        let changes = old_name != name || old_cidr != new_cidr.to_string();
        if changes {
            let nodes: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM nodes WHERE account_id = ?")
                .bind(account.id)
                .fetch_one(&mut *tx)
                .await?;
            if nodes > 0 {
                return Err(StoreError::Conflict(format!(
                    "network {old_name:?} already has devices, so its name and address block stay as they are"
                )));
            }
            let taken: i64 =
                sqlx::query_scalar("SELECT COUNT(*) FROM accounts WHERE name = ? AND id <> ?")
                    .bind(name)
                    .bind(account.id)
                    .fetch_one(&mut *tx)
                    .await?;
            if taken > 0 {
                return Err(StoreError::Conflict(format!(
                    "another network on this server is already called {name:?}; pick another name"
                )));
            }
            sqlx::query("UPDATE accounts SET name = ?, cidr = ? WHERE id = ?")
                .bind(name)
                .bind(new_cidr.to_string())
                .bind(account.id)
                .execute(&mut *tx)
                .await?;
            audit::record(
                &mut tx,
                account.id,
                actor,
                action::ACCOUNT_RENAME,
                &old_name,
                &format!("now {name:?}, block {new_cidr}"),
            )
            .await?;
        }
        sqlx::query(
            "INSERT INTO dashboard_wizard (account_id, network_named_at) VALUES (?, ?) \
             ON CONFLICT(account_id) DO UPDATE SET network_named_at = excluded.network_named_at",
        )
        .bind(account.id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Account {
            id: account.id,
            name: name.to_string(),
            cidr: new_cidr,
            created_at: account.created_at,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn emails_and_passwords_are_checked() {
        assert_eq!(
            normalize_email(" Alex@Example.COM ").unwrap(),
            "alex@example.com"
        );
        assert!(normalize_email("alex").is_err());
        assert!(normalize_email("@example.com").is_err());
        assert!(normalize_email("a b@example.com").is_err());
        assert!(normalize_email("a@b@c").is_err());
        assert!(check_password("short").unwrap_err().contains("at least 10"));
        assert!(check_password("correct horse battery").is_ok());
        assert!(check_password(&"x".repeat(1025)).is_err());
    }
}
