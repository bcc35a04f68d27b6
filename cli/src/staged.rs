//! All-or-nothing output files.
//!
//! Each output is written to a hidden temporary file in its destination's directory
//! (`.NAME.cppo-PID-N.tmp`), flushed and synced, and renamed into place only after every
//! output of the command has been written. A rename within one directory is atomic, so
//! a reader never sees a half-written file, and a failed command leaves nothing behind:
//! a [`Staged`] file dropped without being committed (by [`commit_all`]) removes its
//! temporary file.

use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use crate::failure::Failure;

/// A temporary file waiting to be renamed to its destination.
#[derive(Debug)]
pub struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    /// Set once the temporary file is renamed (or removed): nothing left to clean up.
    settled: bool,
}

impl Staged {
    /// Creates the temporary file for `dest` and fills it with `write`, then flushes and
    /// syncs it to disk.
    pub fn write<E>(
        dest: &Path,
        write: impl FnOnce(BufWriter<File>) -> Result<BufWriter<File>, E>,
    ) -> Result<Self, Failure>
    where
        E: std::error::Error + 'static,
    {
        let (staged, file) = Self::create(dest)?;
        let fail = |e: &(dyn std::error::Error + 'static)| {
            Failure::system(format!("cannot write {}", dest.display()), e)
        };
        let writer = write(BufWriter::new(file)).map_err(|e| fail(&e))?;
        let file = writer.into_inner().map_err(|e| fail(e.error()))?;
        file.sync_all().map_err(|e| fail(&e))?;
        Ok(staged)
    }

    fn create(dest: &Path) -> Result<(Self, File), Failure> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = dest
            .file_name()
            .ok_or_else(|| Failure::Input(format!("{} is not a file name", dest.display())))?;
        let dir = dest.parent().unwrap_or(Path::new(""));
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let tmp_name = format!(
                ".{}.cppo-{}-{n}.tmp",
                name.to_string_lossy(),
                std::process::id()
            );
            let tmp = dir.join(tmp_name);
            match File::create_new(&tmp) {
                Ok(file) => {
                    let staged = Self {
                        tmp,
                        dest: dest.to_path_buf(),
                        settled: false,
                    };
                    return Ok((staged, file));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 1000 => {}
                Err(e) => {
                    return Err(Failure::system(
                        format!("cannot create a file beside {}", dest.display()),
                        &e,
                    ));
                }
            }
        }
    }

    /// Renames the temporary file to its destination.
    fn commit(&mut self) -> io::Result<()> {
        fs::rename(&self.tmp, &self.dest)?;
        self.settled = true;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        if !self.settled {
            // Best effort: the command is failing already, and reports that failure.
            let _ = fs::remove_file(&self.tmp);
        }
    }
}

/// Renames every staged file into place, in order. If one rename fails, the files
/// already renamed are removed again (an output that existed before the command is then
/// gone too: a failed command leaves no output rather than a mix of old and new), and
/// the remaining temporary files are removed.
pub fn commit_all(files: Vec<Staged>) -> Result<(), Failure> {
    let mut done: Vec<PathBuf> = Vec::with_capacity(files.len());
    for mut file in files {
        if let Err(e) = file.commit() {
            for path in &done {
                let _ = fs::remove_file(path);
            }
            return Err(Failure::system(
                format!(
                    "cannot move the output into place at {}",
                    file.dest.display()
                ),
                &e,
            ));
        }
        done.push(file.dest.clone());
    }
    Ok(())
}
