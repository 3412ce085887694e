//! An allocator that counts what the current thread allocates, so that a
//! property can bound a parser's allocations by its input: libtest runs
//! tests on several threads at once, so a process-wide count would mix them.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    // `const` initialisers: no lazy initialisation, no destructor, so the
    // allocator can touch them without allocating itself.
    static CALLS: Cell<u64> = const { Cell::new(0) };
    static BYTES: Cell<u64> = const { Cell::new(0) };
}

fn count(size: usize) {
    // `try_with`: a thread being torn down has no locals left; not counted.
    let _ = CALLS.try_with(|c| c.set(c.get() + 1));
    let _ = BYTES.try_with(|b| b.set(b.get() + size as u64));
}

// SAFETY: every call is forwarded to the system allocator unchanged.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: the caller's contract is passed on.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: as above.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: as above.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// What the current thread allocated while running a closure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocated {
    /// Calls to alloc, alloc_zeroed and realloc.
    pub calls: u64,
    /// Bytes they asked for, summed (a realloc counts its new size).
    pub bytes: u64,
}

/// Runs `f` and says what it allocated on this thread.
pub fn measure<T>(f: impl FnOnce() -> T) -> (T, Allocated) {
    let (c0, b0) = (CALLS.with(Cell::get), BYTES.with(Cell::get));
    let out = f();
    let (c1, b1) = (CALLS.with(Cell::get), BYTES.with(Cell::get));
    (out, Allocated { calls: c1 - c0, bytes: b1 - b0 })
}

#[test]
fn counts_this_threads_allocations() {
    let (v, a) = measure(|| vec![0u8; 1000]);
    assert_eq!(v.len(), 1000);
    assert_eq!(a, Allocated { calls: 1, bytes: 1000 });
    let ((), a) = measure(|| ());
    assert_eq!(a.calls, 0);
}
