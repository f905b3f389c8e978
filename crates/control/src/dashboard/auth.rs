//! Passwords (argon2id), session cookies, CSRF tokens and the login rate limit.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use axum::http::{header, HeaderMap};
use rand::rngs::OsRng;

use crate::store::new_secret;

/// The session cookie.
pub const SESSION_COOKIE: &str = "trellis_session";
/// The cookie that carries the CSRF token of forms shown before login
/// (login, first admin): the form must send the same value back.
pub const PRE_CSRF_COOKIE: &str = "trellis_csrf";
/// Failed logins allowed per email and client address within [`LOGIN_WINDOW`].
pub const MAX_LOGIN_FAILURES: usize = 5;
/// The window of the login rate limit.
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);

/// Hashes a password with argon2id (default parameters) into a PHC string.
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing the password failed: {e}"))
}

/// Whether `password` matches the PHC string `hash`.
pub fn verify_password(password: &str, hash: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// A PHC string that matches no password, verified for unknown emails so that
/// they take as long as known ones.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password(&new_secret("")).unwrap_or_default())
}

/// Compares two strings in time independent of where they differ.
pub fn ct_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in the request, if any.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.trim())
        .filter(|v| !v.is_empty())
}

/// A `Set-Cookie` value: HttpOnly, SameSite=Strict, Path=/, Secure when the
/// dashboard is served over https. `max_age` None makes a browser-session cookie.
pub fn set_cookie(name: &str, value: &str, secure: bool, max_age: Option<i64>) -> String {
    let mut c = format!("{name}={value}; HttpOnly; SameSite=Strict; Path=/");
    if let Some(age) = max_age {
        c.push_str(&format!("; Max-Age={age}"));
    }
    if secure {
        c.push_str("; Secure");
    }
    c
}

/// A `Set-Cookie` value that removes cookie `name`.
pub fn clear_cookie(name: &str, secure: bool) -> String {
    set_cookie(name, "", secure, Some(0))
}

/// Counts failed logins per (email, client address) and refuses more than
/// [`MAX_LOGIN_FAILURES`] within [`LOGIN_WINDOW`].
#[derive(Default)]
pub struct LoginLimiter {
    failures: Mutex<HashMap<(String, IpAddr), VecDeque<Instant>>>,
}

impl LoginLimiter {
    /// Seconds to wait before the next try, if this email+address is locked out now.
    pub fn locked(&self, email: &str, ip: IpAddr) -> Option<u64> {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        let list = map.get_mut(&(email.to_string(), ip))?;
        while list
            .front()
            .is_some_and(|t| now.duration_since(*t) >= LOGIN_WINDOW)
        {
            list.pop_front();
        }
        if list.len() >= MAX_LOGIN_FAILURES {
            let oldest = *list.front()?;
            let wait = LOGIN_WINDOW.saturating_sub(now.duration_since(oldest));
            return Some(wait.as_secs().max(1));
        }
        None
    }

    /// Records a failed login.
    pub fn failed(&self, email: &str, ip: IpAddr) {
        let now = Instant::now();
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() > 10_000 {
            map.retain(|_, l| {
                l.back()
                    .is_some_and(|t| now.duration_since(*t) < LOGIN_WINDOW)
            });
        }
        let list = map.entry((email.to_string(), ip)).or_default();
        list.push_back(now);
        while list.len() > MAX_LOGIN_FAILURES {
            list.pop_front();
        }
    }

    /// Forgets the failures of this email+address (after a good login).
    pub fn succeeded(&self, email: &str, ip: IpAddr) {
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        map.remove(&(email.to_string(), ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_hash_and_verify() {
        let h = hash_password("correct horse battery").unwrap();
        assert!(h.starts_with("$argon2id$"), "{h}");
        assert!(verify_password("correct horse battery", &h));
        assert!(!verify_password("correct horse batterY", &h));
        assert!(!verify_password("x", "not a hash"));
        assert!(!verify_password("x", dummy_hash()));
    }

    #[test]
    fn cookies_parse_and_carry_their_flags() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=1; trellis_session=abc ; b=".parse().unwrap(),
        );
        assert_eq!(cookie(&h, SESSION_COOKIE), Some("abc"));
        assert_eq!(cookie(&h, "b"), None);
        assert_eq!(cookie(&h, "c"), None);
        let c = set_cookie(SESSION_COOKIE, "v", true, None);
        assert_eq!(
            c,
            "trellis_session=v; HttpOnly; SameSite=Strict; Path=/; Secure"
        );
        assert!(!set_cookie(SESSION_COOKIE, "v", false, None).contains("Secure"));
        assert!(clear_cookie(SESSION_COOKIE, false).contains("Max-Age=0"));
        assert!(ct_eq("abc", "abc") && !ct_eq("abc", "abd") && !ct_eq("abc", "ab"));
    }

    #[test]
    fn login_limit_locks_after_five_failures_per_email_and_address() {
        let l = LoginLimiter::default();
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        for _ in 0..MAX_LOGIN_FAILURES {
            assert!(l.locked("a@x", ip).is_none());
            l.failed("a@x", ip);
        }
        assert!(l.locked("a@x", ip).is_some_and(|s| (1..=60).contains(&s)));
        assert!(l.locked("b@x", ip).is_none());
        assert!(l.locked("a@x", other).is_none());
        l.succeeded("a@x", ip);
        assert!(l.locked("a@x", ip).is_none());
    }
}
