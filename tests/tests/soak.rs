//! Soak-lite: ten cycles of start, traffic and SIGKILL on clsact and on auto (TCX from 6.6 on):
//! nothing of the killed runs remains after a `podtrace cleanup`, and every run uses the same
//! fds and about the same memory. `cargo xtask soak` runs the full soak. Needs root.

use anyhow::Result;
use podtrace_tests::{
    lab::{Lab, LabSpec, unique_prefix},
    soak,
};

#[test]
fn killed_runs_leave_nothing_behind_and_stay_flat() -> Result<()> {
    let lab = Lab::up(LabSpec { prefix: unique_prefix("soak"), ..Default::default() })?;
    for attach in ["clsact", "auto"] {
        let figures = soak::kill_cycles(&lab, attach, 10)?;
        println!("{}\n{}", figures.summary(), figures.series());
        assert_eq!(figures.problems(), Vec::<String>::new(), "{}", figures.summary());
    }
    Ok(())
}
