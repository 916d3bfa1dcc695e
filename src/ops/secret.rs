//! The shared secret from a file (`--secret-file`, or the systemd credential
//! `tcp-relay-secret`), so that it appears in neither argv nor the environment.
//!
//! `ps` shows every process's arguments to every user, and a process's
//! environment is readable by its user and inherited by its children; a
//! file with mode 0600 (or a systemd credential, which only the service can
//! read) is neither. Which source wins, in order:
//!
//! 1. `--secret` or `TCP_RELAY_SECRET` (the command line refuses
//!    `--secret` together with `--secret-file`);
//! 2. `--secret-file <PATH>`;
//! 3. `$CREDENTIALS_DIRECTORY/tcp-relay-secret`, if that file exists: what
//!    `LoadCredential=tcp-relay-secret:/etc/tcp-relay/secret` provides;
//! 4. no secret.

use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::config::Secret;

/// The credential name the systemd units load the secret under.
pub const CREDENTIAL: &str = "tcp-relay-secret";
/// The variable in which systemd names the directory holding the credentials.
pub const CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// Largest secret file read. A secret is a few dozen bytes; the cap turns a
/// wrong path (a log file, `/dev/zero`) into an error instead of a hang.
pub const MAX_SECRET_FILE: usize = 64 * 1024;

/// The secret the command line and the environment select (see the module
/// docs for the order), reading `$CREDENTIALS_DIRECTORY` itself.
pub fn from_args(secret: Option<String>, file: Option<&Path>) -> Result<Option<Secret>, String> {
    let credentials = std::env::var_os(CREDENTIALS_DIRECTORY);
    resolve(secret, file, credentials.as_deref())
}

/// The secret from, in order: `secret` (given on the command line or in the
/// environment), the file at `file`, the credential in `credentials_dir`.
/// A file that was named but cannot be used is an error naming its path.
pub fn resolve(
    secret: Option<String>,
    file: Option<&Path>,
    credentials_dir: Option<&OsStr>,
) -> Result<Option<Secret>, String> {
    if let Some(secret) = secret {
        return Ok(Some(Secret(secret.into_bytes())));
    }
    if let Some(path) = file {
        return read_secret_file(path).map(Some);
    }
    match credentials_dir.filter(|dir| !dir.is_empty()) {
        Some(dir) => read_credential(&Path::new(dir).join(CREDENTIAL)),
        None => Ok(None),
    }
}

/// The credential at `path` if it exists: systemd passes a directory to
/// every unit with credentials, and this one may simply not be among them.
fn read_credential(path: &Path) -> Result<Option<Secret>, String> {
    match std::fs::metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        _ => read_secret_file(path).map(Some),
    }
}

/// The secret in the file at `path`: its bytes less one trailing newline
/// (`\n` or `\r\n`, as editors and `echo` leave), which must not be empty.
/// A file that group or others may access is used, with a warning.
pub fn read_secret_file(path: &Path) -> Result<Secret, String> {
    let shown = path.display();
    let mut file = File::open(path).map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    // The mode of the file we opened, not of whatever the path names by now.
    let mode = file
        .metadata()
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?
        .permissions()
        .mode();
    if let Some(warning) = mode_warning(path, mode) {
        log::warn!("{warning}");
    }
    let mut bytes = Vec::new();
    file.by_ref()
        .take(MAX_SECRET_FILE as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read secret file {shown}: {e}"))?;
    if bytes.len() > MAX_SECRET_FILE {
        return Err(format!(
            "secret file {shown} is larger than {} KiB: is it the right file?",
            MAX_SECRET_FILE / 1024
        ));
    }
    strip_one_newline(&mut bytes);
    if bytes.is_empty() {
        return Err(format!("secret file {shown} is empty"));
    }
    Ok(Secret(bytes))
}

/// Drops one trailing `\n` or `\r\n`, and no more: a secret may itself end
/// in whitespace, and only the final line ending is an editor's addition.
fn strip_one_newline(bytes: &mut Vec<u8>) {
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.pop();
    }
}

/// The warning for a secret file that group or others may access (any of
/// the mode bits 0o077), or `None` for a private one.
pub fn mode_warning(path: &Path, mode: u32) -> Option<String> {
    let permissions = mode & 0o7777;
    (permissions & 0o077 != 0).then(|| {
        format!(
            "secret file {} has mode {permissions:04o}: group or others may read it \
             (chmod 600 it)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::testdir::TestDir;
    use std::path::PathBuf;

    fn write(dir: &TestDir, name: &str, contents: &[u8], mode: u32) -> PathBuf {
        let path = dir.path().join(name);
        std::fs::write(&path, contents).expect("write the secret file");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))
            .expect("set the secret file's mode");
        path
    }

    #[test]
    fn one_trailing_newline_is_stripped_and_only_one() {
        let dir = TestDir::new("secret-newlines");
        let cases: [(&[u8], &[u8]); 6] = [
            (b"hunter2", b"hunter2"),
            (b"hunter2\n", b"hunter2"),
            (b"hunter2\r\n", b"hunter2"),
            (b"hunter2\n\n", b"hunter2\n"),
            (b"hunter2 \n", b"hunter2 "),
            (b"\x00\xffbinary\n", b"\x00\xffbinary"),
        ];
        for (i, (contents, secret)) in cases.into_iter().enumerate() {
            let path = write(&dir, &format!("s{i}"), contents, 0o600);
            let read = read_secret_file(&path).expect("a good secret file");
            assert_eq!(read.0, secret, "from {contents:?}");
        }
    }

    #[test]
    fn empty_missing_and_oversized_files_are_errors_naming_the_path() {
        let dir = TestDir::new("secret-bad");
        for (name, contents) in [("empty", &b""[..]), ("lf", b"\n"), ("crlf", b"\r\n")] {
            let path = write(&dir, name, contents, 0o600);
            let error = read_secret_file(&path).expect_err("an empty secret");
            assert!(
                error.contains("is empty") && error.contains(name),
                "{error}"
            );
        }
        let missing = dir.path().join("missing");
        let error = read_secret_file(&missing).expect_err("a missing file");
        assert!(error.contains(&missing.display().to_string()), "{error}");
        let big = write(&dir, "big", &vec![b'x'; MAX_SECRET_FILE + 1], 0o600);
        assert!(read_secret_file(&big).is_err());
        let just_fits = write(&dir, "fits", &vec![b'x'; MAX_SECRET_FILE], 0o600);
        assert_eq!(
            read_secret_file(&just_fits).map(|s| s.0.len()),
            Ok(MAX_SECRET_FILE)
        );
    }

    #[test]
    fn a_file_others_may_read_is_used_with_a_warning() {
        let dir = TestDir::new("secret-modes");
        let open = write(&dir, "open", b"hunter2\n", 0o644);
        assert_eq!(read_secret_file(&open), Ok(Secret(b"hunter2".to_vec())));
        let warning = mode_warning(&open, 0o100644).expect("0644 is warned about");
        assert!(
            warning.contains("0644") && warning.contains("open"),
            "{warning}"
        );
        for private in [0o600, 0o400, 0o100600, 0o700] {
            assert_eq!(mode_warning(&open, private), None, "{private:o}");
        }
        for loose in [0o640, 0o604, 0o610, 0o601, 0o620] {
            assert!(mode_warning(&open, loose).is_some(), "{loose:o}");
        }
    }

    #[test]
    fn the_sources_are_taken_in_order() {
        let dir = TestDir::new("secret-order");
        let file = write(&dir, "file", b"from-file\n", 0o600);
        write(&dir, CREDENTIAL, b"from-credential\n", 0o400);
        let creds = Some(dir.path().as_os_str());
        let secret = |s: &str| Ok(Some(Secret(s.as_bytes().to_vec())));
        let given = Some("given".to_owned());
        assert_eq!(resolve(given, Some(&file), creds), secret("given"));
        assert_eq!(resolve(None, Some(&file), creds), secret("from-file"));
        assert_eq!(resolve(None, None, creds), secret("from-credential"));
        assert_eq!(resolve(None, None, None), Ok(None));
        assert_eq!(resolve(None, None, Some(OsStr::new(""))), Ok(None));
    }

    #[test]
    fn a_credentials_directory_without_the_secret_means_no_secret() {
        let dir = TestDir::new("secret-nocred");
        assert_eq!(resolve(None, None, Some(dir.path().as_os_str())), Ok(None));
        write(&dir, CREDENTIAL, b"", 0o400);
        let error = resolve(None, None, Some(dir.path().as_os_str())).expect_err("empty");
        assert!(error.contains(CREDENTIAL), "{error}");
    }

    #[test]
    fn a_named_file_that_is_missing_is_an_error_even_with_a_credential() {
        let dir = TestDir::new("secret-named");
        write(&dir, CREDENTIAL, b"from-credential", 0o400);
        let missing = dir.path().join("missing");
        let creds = Some(dir.path().as_os_str());
        assert!(resolve(None, Some(&missing), creds).is_err());
    }
}
