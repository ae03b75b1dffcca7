//! Fault injection for the whole-system tests, in debug builds only: the module and every
//! call site are `#[cfg(debug_assertions)]`, so release builds have neither.
//! `KETENBUS_FAULT=<point>:<n>` makes the pass after the first `n` through `point` panic,
//! once (`router_panic_after:5`, `lane_panic_after:3`); a point named `..._kill_after` ends
//! the process at once instead, as SIGKILL would (`finish_kill_after:3`).

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// Count a pass through `point`; panic on the one `KETENBUS_FAULT` names (or, for a
/// `..._kill_after` point, abort: no unwinding, nothing flushed or committed).
///
/// # Panics
/// That is its purpose.
pub fn hit(point: &str) {
    static FAULT: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static PASSES: AtomicU64 = AtomicU64::new(0);
    let fault = FAULT.get_or_init(|| {
        let v = std::env::var("KETENBUS_FAULT").ok()?;
        let (p, n) = v.split_once(':')?;
        Some((p.to_owned(), n.parse().ok()?))
    });
    if let Some((p, n)) = fault
        && p == point
        && PASSES.fetch_add(1, Ordering::SeqCst) == *n
    {
        if point.ends_with("_kill_after") {
            eprintln!("injected fault {point}:{n} (KETENBUS_FAULT): aborting");
            std::process::abort();
        }
        panic!("injected fault {point}:{n} (KETENBUS_FAULT)");
    }
}
