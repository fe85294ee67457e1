//! Operator subcommands that change the store: `account`, `customer` and
//! `system`.
//!
//! These are clap derive types that `main.rs` embeds, plus one `run_*`
//! function per group. The functions are synchronous and use the
//! [`SqliteStore`] methods directly, so the CLI needs no async runtime; the
//! running broker notices the changes through `PRAGMA data_version`.
//!
//! Input and output are passed in (`BufRead`/`Write`) so tests can drive
//! the commands with in-memory buffers. Output contract relied on by
//! scripts:
//! * `account add` without `--password-stdin` prints the generated password
//!   as the last line, `password: <pw>`.
//! * `system add` and `system rotate-token` print the agent token alone on
//!   the last line of stdout, after a line saying it is shown once;
//!   `system revoke-token` prints no token.
//!
//! Nothing here logs a password or a token; they go only to `out`.

use std::io::{BufRead, Read, Write};

use crate::secret::{self, SecretError, MAX_PASSWORD_BYTES};
use crate::store::sqlite::SqliteStore;
use crate::store::StoreError;

/// Errors from the management subcommands.
#[derive(Debug, thiserror::Error)]
pub enum ManageError {
    /// The store refused or failed (messages like
    /// "account 'x' already exists", "no such customer '1234'").
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Hashing the password failed.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// The password given on stdin is unusable.
    #[error("password on stdin: {0}")]
    PasswordInput(&'static str),
    /// Reading stdin or writing stdout failed.
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// `maintgate account ...`: proxy accounts used by support engineers.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum AccountCmd {
    /// Create an account. Without --password-stdin a strong password is
    /// generated and printed.
    Add {
        /// User name: 1-64 of A-Z a-z 0-9 . _ -
        #[arg(value_name = "USER")]
        user: String,
        /// Read the password from the first line of stdin instead of
        /// generating one.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Set an account's password, read from the first line of stdin.
    Passwd {
        /// User name.
        #[arg(value_name = "USER")]
        user: String,
        /// Read the password from the first line of stdin (required).
        #[arg(long, required = true)]
        password_stdin: bool,
    },
    /// Disable an account: it can no longer authenticate.
    Disable {
        /// User name.
        #[arg(value_name = "USER")]
        user: String,
    },
    /// Enable a disabled account.
    Enable {
        /// User name.
        #[arg(value_name = "USER")]
        user: String,
    },
    /// List accounts with their state and customers.
    List,
}

/// `maintgate customer ...`: customers (sites) and who manages them.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum CustomerCmd {
    /// Create a customer managed by an account.
    Add {
        /// Customer id: 1-64 ASCII letters and digits (stored lowercased).
        #[arg(value_name = "CUSTOMER-ID")]
        customer_id: String,
        /// The account that manages this customer.
        #[arg(long, value_name = "USER")]
        account: String,
        /// Display name for operators.
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
    },
    /// List customers with their accounts.
    List,
}

/// `maintgate system ...`: systems at a customer's site and their agent
/// tokens.
#[derive(Debug, Clone, PartialEq, Eq, clap::Subcommand)]
pub enum SystemCmd {
    /// Add a system and print its agent token (shown once). A customer's
    /// first system is its primary.
    Add {
        /// Customer id.
        #[arg(value_name = "CUSTOMER-ID")]
        customer_id: String,
        /// System name: 1-63 of a-z 0-9 - _ (stored lowercased).
        #[arg(value_name = "SYSTEM-NAME")]
        system_name: String,
        /// Make this the customer's primary system (reached as
        /// `<customer-id>.maint.<domain>`).
        #[arg(long)]
        primary: bool,
    },
    /// Issue a new agent token for a system; the old token stops working.
    RotateToken {
        /// Customer id.
        #[arg(value_name = "CUSTOMER-ID")]
        customer_id: String,
        /// System name.
        #[arg(value_name = "SYSTEM-NAME")]
        system_name: String,
    },
    /// Revoke a system's agent token without issuing a new one: its agent
    /// is disconnected and no token works until `rotate-token`.
    RevokeToken {
        /// Customer id.
        #[arg(value_name = "CUSTOMER-ID")]
        customer_id: String,
        /// System name.
        #[arg(value_name = "SYSTEM-NAME")]
        system_name: String,
    },
    /// List a customer's systems.
    List {
        /// Customer id.
        #[arg(value_name = "CUSTOMER-ID")]
        customer_id: String,
    },
}

/// Reads one password line from `input`: trailing CR/LF stripped, at most
/// [`MAX_PASSWORD_BYTES`] bytes, not empty, UTF-8. Reads at most a few
/// bytes past the cap, so a huge stdin cannot exhaust memory.
fn read_password(input: &mut dyn BufRead) -> Result<String, ManageError> {
    // Cap + CR + LF + one byte to tell "too long" from "exactly at the cap".
    let limit = u64::try_from(MAX_PASSWORD_BYTES + 3).unwrap_or(u64::MAX);
    let mut buf = Vec::with_capacity(MAX_PASSWORD_BYTES + 3);
    input.take(limit).read_until(b'\n', &mut buf)?;
    if buf.last() == Some(&b'\n') {
        buf.pop();
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    if buf.is_empty() {
        return Err(ManageError::PasswordInput("empty (expected one line)"));
    }
    if buf.len() > MAX_PASSWORD_BYTES {
        return Err(ManageError::PasswordInput(
            "longer than 128 bytes (not truncated; choose a shorter one)",
        ));
    }
    if buf.contains(&b'\n') || buf.contains(&b'\r') {
        return Err(ManageError::PasswordInput("contains a line break"));
    }
    String::from_utf8(buf).map_err(|_| ManageError::PasswordInput("not valid UTF-8"))
}

/// Runs `maintgate account ...`.
///
/// # Errors
/// [`ManageError::Store`] for store refusals (unknown or duplicate account,
/// invalid name), [`ManageError::PasswordInput`] for an unusable password
/// on stdin, [`ManageError::Secret`] if hashing fails and
/// [`ManageError::Io`] if reading or writing fails.
pub fn run_account(
    cmd: &AccountCmd,
    store: &SqliteStore,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), ManageError> {
    match cmd {
        AccountCmd::Add {
            user,
            password_stdin,
        } => {
            if !secret::valid_user_name(user) {
                // Fail before reading stdin or spending time on Argon2.
                return Err(StoreError::Invalid(
                    "account name (use 1-64 of A-Z a-z 0-9 . _ -)".to_owned(),
                )
                .into());
            }
            let (password, generated) = if *password_stdin {
                (read_password(input)?, false)
            } else {
                (secret::generate_password(), true)
            };
            let hash = secret::hash_password(&password)?;
            let account = store.add_account(user, &hash)?;
            writeln!(out, "account '{}' added", account.name)?;
            if generated {
                writeln!(out, "password (shown once):")?;
                writeln!(out, "password: {password}")?;
            }
        }
        AccountCmd::Passwd { user, .. } => {
            // Check the account first so a typo does not cost a hash.
            if store.account_by_name(user)?.is_none() {
                return Err(StoreError::NotFound(format!("account '{user}'")).into());
            }
            let password = read_password(input)?;
            let hash = secret::hash_password(&password)?;
            store.set_password(user, &hash)?;
            writeln!(out, "password of account '{user}' changed")?;
        }
        AccountCmd::Disable { user } => {
            store.set_account_enabled(user, false)?;
            writeln!(out, "account '{user}' disabled")?;
        }
        AccountCmd::Enable { user } => {
            store.set_account_enabled(user, true)?;
            writeln!(out, "account '{user}' enabled")?;
        }
        AccountCmd::List => {
            let accounts = store.list_accounts()?;
            let width = accounts
                .iter()
                .map(|a| a.name.len())
                .chain(std::iter::once("NAME".len()))
                .max()
                .unwrap_or(4);
            writeln!(out, "{:<width$}  {:<7}  CUSTOMERS", "NAME", "ENABLED")?;
            for a in &accounts {
                let customers = if a.customers.is_empty() {
                    "-".to_owned()
                } else {
                    a.customers.join(",")
                };
                let enabled = if a.enabled { "yes" } else { "no" };
                writeln!(out, "{:<width$}  {enabled:<7}  {customers}", a.name)?;
            }
        }
    }
    Ok(())
}

/// Runs `maintgate customer ...`.
///
/// # Errors
/// [`ManageError::Store`] for store refusals (duplicate customer, unknown
/// account, invalid id or name) and [`ManageError::Io`] if writing fails.
pub fn run_customer(
    cmd: &CustomerCmd,
    store: &SqliteStore,
    _input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), ManageError> {
    match cmd {
        CustomerCmd::Add {
            customer_id,
            account,
            name,
        } => {
            let c = store.add_customer(customer_id, account, name.as_deref())?;
            writeln!(
                out,
                "customer '{}' added, managed by account '{}'",
                c.id,
                c.accounts.join("', '")
            )?;
        }
        CustomerCmd::List => {
            let customers = store.list_customers()?;
            let width = customers
                .iter()
                .map(|c| c.id.len())
                .chain(std::iter::once("CUSTOMER".len()))
                .max()
                .unwrap_or(8);
            writeln!(out, "{:<width$}  ACCOUNTS  NAME", "CUSTOMER")?;
            for c in &customers {
                let accounts = if c.accounts.is_empty() {
                    "-".to_owned()
                } else {
                    c.accounts.join(",")
                };
                writeln!(
                    out,
                    "{:<width$}  {accounts:<8}  {}",
                    c.id,
                    c.name.as_deref().unwrap_or("-")
                )?;
            }
        }
    }
    Ok(())
}

/// Writes the token block: a line saying it is shown once, then the token
/// alone on the last line (scripts take the last line).
fn print_token(out: &mut dyn Write, token: &str) -> Result<(), ManageError> {
    writeln!(
        out,
        "agent token (shown once; put it in the agent's token_file):"
    )?;
    writeln!(out, "{token}")?;
    Ok(())
}

/// Runs `maintgate system ...`.
///
/// # Errors
/// [`ManageError::Store`] for store refusals (unknown customer or system,
/// duplicate system, invalid name) and [`ManageError::Io`] if writing
/// fails.
pub fn run_system(
    cmd: &SystemCmd,
    store: &SqliteStore,
    _input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> Result<(), ManageError> {
    match cmd {
        SystemCmd::Add {
            customer_id,
            system_name,
            primary,
        } => {
            let token = secret::generate_token();
            let sys = store.add_system(
                customer_id,
                system_name,
                *primary,
                &secret::token_hash(&token),
            )?;
            let role = if sys.is_primary {
                "primary"
            } else {
                "secondary"
            };
            writeln!(
                out,
                "system '{}' added to customer '{}' ({role})",
                sys.name, sys.customer_id
            )?;
            print_token(out, &token)?;
        }
        SystemCmd::RotateToken {
            customer_id,
            system_name,
        } => {
            let token = secret::generate_token();
            let sys = store.rotate_token(customer_id, system_name, &secret::token_hash(&token))?;
            writeln!(
                out,
                "new token for system '{}' of customer '{}'; the old token no longer works",
                sys.name, sys.customer_id
            )?;
            print_token(out, &token)?;
        }
        SystemCmd::RevokeToken {
            customer_id,
            system_name,
        } => {
            let sys = store.revoke_token(customer_id, system_name)?;
            writeln!(
                out,
                "token of system '{}' of customer '{}' revoked; its agent is disconnected until `system rotate-token`",
                sys.name, sys.customer_id
            )?;
        }
        SystemCmd::List { customer_id } => {
            let systems = store.list_systems(customer_id)?;
            writeln!(out, "SYSTEM  PRIMARY")?;
            for s in &systems {
                let primary = if s.is_primary { "yes" } else { "no" };
                writeln!(out, "{}  {primary}", s.name)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::{token_hash, verify_password};
    use crate::store::DB_FILE;
    use clap::{Parser, Subcommand};

    /// A stand-in for main.rs's CLI, to check the clap contract.
    #[derive(Debug, Parser)]
    struct Cli {
        #[command(subcommand)]
        cmd: Top,
    }

    #[derive(Debug, Subcommand)]
    enum Top {
        #[command(subcommand)]
        Account(AccountCmd),
        #[command(subcommand)]
        Customer(CustomerCmd),
        #[command(subcommand)]
        System(SystemCmd),
    }

    fn parse(args: &[&str]) -> Result<Top, clap::Error> {
        Cli::try_parse_from(std::iter::once("maintgate").chain(args.iter().copied())).map(|c| c.cmd)
    }

    fn temp_store() -> (tempfile::TempDir, SqliteStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join(DB_FILE)).unwrap();
        (dir, store)
    }

    /// Runs a command line against `store` with `stdin`, returning stdout.
    fn run(store: &SqliteStore, args: &[&str], stdin: &str) -> Result<String, ManageError> {
        let mut input = std::io::Cursor::new(stdin.as_bytes().to_vec());
        let mut out = Vec::new();
        match parse(args).unwrap() {
            Top::Account(c) => run_account(&c, store, &mut input, &mut out)?,
            Top::Customer(c) => run_customer(&c, store, &mut input, &mut out)?,
            Top::System(c) => run_system(&c, store, &mut input, &mut out)?,
        }
        Ok(String::from_utf8(out).unwrap())
    }

    fn last_line(s: &str) -> &str {
        s.lines().last().unwrap()
    }

    /// An account with a cheap fake hash, so tests that do not check the
    /// password skip Argon2 (slow in debug builds).
    fn fake_account(store: &SqliteStore, name: &str) {
        store.add_account(name, "$argon2id$fake").unwrap();
    }

    #[test]
    fn clap_contract() {
        Cli::command_for_test().debug_assert();
        assert_eq!(
            parse(&["account", "add", "acme"]).unwrap_matches_account(),
            AccountCmd::Add {
                user: "acme".into(),
                password_stdin: false
            }
        );
        assert_eq!(
            parse(&["account", "add", "acme", "--password-stdin"]).unwrap_matches_account(),
            AccountCmd::Add {
                user: "acme".into(),
                password_stdin: true
            }
        );
        assert!(parse(&["account", "passwd", "acme"]).is_err());
        assert_eq!(
            parse(&["account", "passwd", "acme", "--password-stdin"]).unwrap_matches_account(),
            AccountCmd::Passwd {
                user: "acme".into(),
                password_stdin: true
            }
        );
        assert!(parse(&["account", "disable", "acme"]).is_ok());
        assert!(parse(&["account", "enable", "acme"]).is_ok());
        assert!(parse(&["account", "list"]).is_ok());
        assert!(
            parse(&["customer", "add", "1234"]).is_err(),
            "--account is required"
        );
        assert!(matches!(
            parse(&["customer", "add", "1234", "--account", "acme", "--name", "Site A"]).unwrap(),
            Top::Customer(CustomerCmd::Add { ref name, .. }) if name.as_deref() == Some("Site A")
        ));
        assert!(matches!(
            parse(&["system", "add", "1234", "ipo2", "--primary"]).unwrap(),
            Top::System(SystemCmd::Add { primary: true, .. })
        ));
        assert!(matches!(
            parse(&["system", "rotate-token", "1234", "ipo2"]).unwrap(),
            Top::System(SystemCmd::RotateToken { .. })
        ));
    }

    trait UnwrapAccount {
        fn unwrap_matches_account(self) -> AccountCmd;
    }
    impl UnwrapAccount for Result<Top, clap::Error> {
        fn unwrap_matches_account(self) -> AccountCmd {
            match self.unwrap() {
                Top::Account(a) => a,
                other => panic!("not an account command: {other:?}"),
            }
        }
    }
    impl Cli {
        fn command_for_test() -> clap::Command {
            <Self as clap::CommandFactory>::command()
        }
    }

    #[test]
    fn account_add_generates_and_prints_password() {
        let (_dir, store) = temp_store();
        let out = run(&store, &["account", "add", "acme"], "").unwrap();
        let pw = last_line(&out).strip_prefix("password: ").unwrap();
        assert_eq!(pw.len(), secret::GENERATED_PASSWORD_LEN);
        let acct = store.account_by_name("acme").unwrap().unwrap();
        assert!(acct.enabled);
        assert!(verify_password(pw, &acct.password_hash));
    }

    #[test]
    fn account_add_from_stdin_and_passwd() {
        let (_dir, store) = temp_store();
        let out = run(
            &store,
            &["account", "add", "acme", "--password-stdin"],
            "first pw\r\nignored\n",
        )
        .unwrap();
        assert!(
            !out.contains("first pw"),
            "stdin password must not be echoed"
        );
        let h1 = store
            .account_by_name("acme")
            .unwrap()
            .unwrap()
            .password_hash;
        assert!(verify_password("first pw", &h1));

        run(
            &store,
            &["account", "passwd", "acme", "--password-stdin"],
            "second pw",
        )
        .unwrap();
        let h2 = store
            .account_by_name("acme")
            .unwrap()
            .unwrap()
            .password_hash;
        assert_ne!(h1, h2);
        assert!(verify_password("second pw", &h2));
        assert!(!verify_password("first pw", &h2));
    }

    #[test]
    fn password_stdin_rules() {
        let (_dir, store) = temp_store();
        let args = ["account", "add", "acme", "--password-stdin"];
        for (stdin, why) in [
            ("", "empty"),
            ("\n", "empty"),
            ("\r\n", "empty"),
            (
                &*format!("{}\n", "x".repeat(MAX_PASSWORD_BYTES + 1)),
                "longer",
            ),
            (&*"x".repeat(10_000), "longer"),
            ("a\rb\n", "line break"),
            ("\r", "empty"),
        ] {
            let err = run(&store, &args, stdin).unwrap_err();
            assert!(
                matches!(err, ManageError::PasswordInput(_)) && err.to_string().contains(why),
                "{stdin:?}: {err}"
            );
        }
        assert!(store.list_accounts().unwrap().is_empty());
        assert_eq!(
            read_password(&mut std::io::Cursor::new("pässwört\n")).unwrap(),
            "pässwört"
        );
        let mut bad_utf8 = std::io::Cursor::new(vec![0xff, 0xfe, b'\n']);
        let err = run_account(
            &AccountCmd::Add {
                user: "x".into(),
                password_stdin: true,
            },
            &store,
            &mut bad_utf8,
            &mut Vec::new(),
        )
        .unwrap_err();
        assert!(err.to_string().contains("UTF-8"), "{err}");
        assert!(store.list_accounts().unwrap().is_empty());
    }

    #[test]
    fn exactly_max_password_is_accepted() {
        assert_eq!(
            read_password(&mut std::io::Cursor::new(format!(
                "{}\r\n",
                "x".repeat(MAX_PASSWORD_BYTES)
            )))
            .unwrap()
            .len(),
            MAX_PASSWORD_BYTES
        );
    }

    #[test]
    fn account_errors_are_clear() {
        let (_dir, store) = temp_store();
        fake_account(&store, "acme");
        let err = run(
            &store,
            &["account", "add", "ACME", "--password-stdin"],
            "pw\n",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "account 'ACME' already exists");
        let err = run(&store, &["account", "disable", "ghost"], "").unwrap_err();
        assert_eq!(err.to_string(), "no such account 'ghost'");
        let err = run(
            &store,
            &["account", "passwd", "ghost", "--password-stdin"],
            "pw",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no such account 'ghost'");
        let err = run(&store, &["account", "add", "a:b"], "").unwrap_err();
        assert!(err.to_string().starts_with("invalid account name"), "{err}");
    }

    #[test]
    fn disable_enable_and_list() {
        let (_dir, store) = temp_store();
        fake_account(&store, "acme");
        fake_account(&store, "bob");
        run(
            &store,
            &["customer", "add", "1234", "--account", "acme"],
            "",
        )
        .unwrap();
        run(
            &store,
            &["customer", "add", "5678", "--account", "acme"],
            "",
        )
        .unwrap();

        let out = run(&store, &["account", "disable", "acme"], "").unwrap();
        assert_eq!(out, "account 'acme' disabled\n");
        assert!(!store.account_by_name("acme").unwrap().unwrap().enabled);

        let out = run(&store, &["account", "list"], "").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 3, "{out}");
        assert!(lines[0].starts_with("NAME"), "{out}");
        let acme: Vec<&str> = lines[1].split_whitespace().collect();
        assert_eq!(acme, ["acme", "no", "1234,5678"]);
        let bob: Vec<&str> = lines[2].split_whitespace().collect();
        assert_eq!(bob, ["bob", "yes", "-"]);

        run(&store, &["account", "enable", "acme"], "").unwrap();
        assert!(store.account_by_name("acme").unwrap().unwrap().enabled);
    }

    #[test]
    fn customer_add_and_errors() {
        let (_dir, store) = temp_store();
        fake_account(&store, "acme");
        let out = run(
            &store,
            &[
                "customer",
                "add",
                "AB12",
                "--account",
                "acme",
                "--name",
                "Site A",
            ],
            "",
        )
        .unwrap();
        assert_eq!(out, "customer 'ab12' added, managed by account 'acme'\n");
        let acct = store.account_by_name("acme").unwrap().unwrap();
        assert!(store.customer_managed_by(acct.id, "ab12").unwrap());

        let err = run(
            &store,
            &["customer", "add", "ab12", "--account", "acme"],
            "",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "customer 'ab12' already exists");
        let err = run(
            &store,
            &["customer", "add", "cd34", "--account", "ghost"],
            "",
        )
        .unwrap_err();
        assert_eq!(err.to_string(), "no such account 'ghost'");

        let out = run(&store, &["customer", "list"], "").unwrap();
        assert_eq!(out.lines().count(), 2, "{out}");
        assert!(out.contains("ab12") && out.contains("Site A"), "{out}");
    }

    #[test]
    fn system_add_prints_a_working_token() {
        let (_dir, store) = temp_store();
        fake_account(&store, "acme");
        run(
            &store,
            &["customer", "add", "1234", "--account", "acme"],
            "",
        )
        .unwrap();

        // First system: primary even without --primary.
        let out = run(&store, &["system", "add", "1234", "IPO1"], "").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[lines.len() - 2].contains("shown once"), "{out}");
        let token = last_line(&out);
        assert!(token.starts_with(secret::TOKEN_PREFIX), "{out}");
        assert_eq!(token.trim(), token);
        let sys = store
            .system_by_token_hash(&token_hash(token))
            .unwrap()
            .unwrap();
        assert_eq!(
            (sys.customer_id.as_str(), sys.name.as_str()),
            ("1234", "ipo1")
        );
        assert!(sys.is_primary);
        assert!(out.contains("(primary)"), "{out}");

        // Second system without --primary stays secondary.
        let out2 = run(&store, &["system", "add", "1234", "ipo2"], "").unwrap();
        let t2 = last_line(&out2);
        assert_ne!(t2, token);
        let s2 = store
            .system_by_token_hash(&token_hash(t2))
            .unwrap()
            .unwrap();
        assert!(!s2.is_primary);

        // --primary moves the flag.
        let out3 = run(&store, &["system", "add", "1234", "ipo3", "--primary"], "").unwrap();
        let s3 = store
            .system_by_token_hash(&token_hash(last_line(&out3)))
            .unwrap()
            .unwrap();
        assert!(s3.is_primary);
        assert_eq!(store.find_system("1234", None).unwrap(), Some(s3));

        let listed = run(&store, &["system", "list", "1234"], "").unwrap();
        assert_eq!(listed.lines().count(), 4, "{listed}");
        assert!(
            listed.lines().nth(1).unwrap().starts_with("ipo3"),
            "{listed}"
        );
    }

    #[test]
    fn system_errors_are_clear() {
        let (_dir, store) = temp_store();
        fake_account(&store, "acme");
        let err = run(&store, &["system", "add", "1234", "ipo"], "").unwrap_err();
        assert_eq!(err.to_string(), "no such customer '1234'");
        run(
            &store,
            &["customer", "add", "1234", "--account", "acme"],
            "",
        )
        .unwrap();
        run(&store, &["system", "add", "1234", "ipo"], "").unwrap();
        let err = run(&store, &["system", "add", "1234", "IPO"], "").unwrap_err();
        assert_eq!(
            err.to_string(),
            "system 'ipo' of customer '1234' already exists"
        );
        let err = run(&store, &["system", "rotate-token", "1234", "nope"], "").unwrap_err();
        assert_eq!(err.to_string(), "no such system 'nope' of customer '1234'");
        let err = run(&store, &["system", "add", "1234", "a.b"], "").unwrap_err();
        assert!(err.to_string().starts_with("invalid system name"), "{err}");
    }

    /// Account acme managing customer 1234 with system ipo, added through
    /// the CLI; returns the store, the printed token and the system.
    fn customer_with_system() -> (tempfile::TempDir, SqliteStore, String, crate::store::System) {
        let (dir, store) = temp_store();
        fake_account(&store, "acme");
        run(
            &store,
            &["customer", "add", "1234", "--account", "acme"],
            "",
        )
        .unwrap();
        let out = run(&store, &["system", "add", "1234", "ipo"], "").unwrap();
        let token = last_line(&out).to_owned();
        let sys = store
            .system_by_token_hash(&token_hash(&token))
            .unwrap()
            .unwrap();
        (dir, store, token, sys)
    }

    #[test]
    fn revoke_token_leaves_no_working_token() {
        let (_dir, store, token, sys) = customer_with_system();
        let out = run(&store, &["system", "revoke-token", "1234", "IPO"], "").unwrap();
        assert!(out.contains("revoked"), "{out}");
        assert!(!out.contains("mgt_"), "no token is printed: {out}");
        assert_eq!(
            store.system_by_token_hash(&token_hash(&token)).unwrap(),
            None
        );
        assert!(!store
            .system_token_hash_is_current(sys.id, &token_hash(&token))
            .unwrap());
        // Revoking twice is fine; an unknown system is a clear error.
        run(&store, &["system", "revoke-token", "1234", "ipo"], "").unwrap();
        let err = run(&store, &["system", "revoke-token", "1234", "nope"], "").unwrap_err();
        assert_eq!(err.to_string(), "no such system 'nope' of customer '1234'");
        // A rotation issues a working token again.
        let fresh = run(&store, &["system", "rotate-token", "1234", "ipo"], "").unwrap();
        assert!(store
            .system_by_token_hash(&token_hash(last_line(&fresh)))
            .unwrap()
            .is_some());
    }

    #[test]
    fn rotate_token_invalidates_the_old_one() {
        let (_dir, store, old, sys) = customer_with_system();

        let out = run(&store, &["system", "rotate-token", "1234", "IPO"], "").unwrap();
        let lines: Vec<&str> = out.lines().collect();
        assert!(lines[lines.len() - 2].contains("shown once"), "{out}");
        let new = last_line(&out);
        assert_ne!(new, old);
        assert_eq!(store.system_by_token_hash(&token_hash(&old)).unwrap(), None);
        assert!(!store
            .system_token_hash_is_current(sys.id, &token_hash(&old))
            .unwrap());
        assert_eq!(
            store.system_by_token_hash(&token_hash(new)).unwrap(),
            Some(sys.clone())
        );
        assert!(store
            .system_token_hash_is_current(sys.id, &token_hash(new))
            .unwrap());
    }
}
