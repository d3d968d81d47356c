//! Which names `.symbol()` and `#[kprobe(symbol = ...)]` accept: a C symbol, a Rust
//! path without the hash, or the end of one when it names one function only (else an
//! error listing the candidates).

use probekit::{Error, Probe, PtRegs};
use std::hint::black_box;

mod parsing {
    #[inline(never)]
    pub fn lonely_number_parser(x: u64) -> u64 {
        std::hint::black_box(x) + 40
    }
}

mod left {
    #[inline(never)]
    pub fn twin(x: u64) -> u64 {
        std::hint::black_box(x) * 2
    }
}

mod right {
    #[inline(never)]
    pub fn twin(x: u64) -> u64 {
        std::hint::black_box(x) * 3
    }
}

/// Both tests call and probe `lonely_number_parser`: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn addr_of(name: &str) -> Result<usize, Error> {
    Probe::builder().symbol(name).pre(|_| {}).register().map(|p| p.address())
}

#[test]
fn a_rust_path_its_unique_end_or_a_c_symbol() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    // Keep the functions (and their symbols) in the binary.
    assert_eq!(black_box(parsing::lonely_number_parser as fn(u64) -> u64)(2), 42);
    assert_eq!(black_box(left::twin as fn(u64) -> u64)(2) + black_box(right::twin as fn(u64) -> u64)(2), 10);
    let lonely = parsing::lonely_number_parser as fn(u64) -> u64 as usize;
    assert_eq!(addr_of("names::parsing::lonely_number_parser"), Ok(lonely), "the full path");
    assert_eq!(addr_of("parsing::lonely_number_parser"), Ok(lonely), "the end of the path");
    assert_eq!(addr_of("lonely_number_parser"), Ok(lonely), "a plain name, unique in the process");
    assert_eq!(addr_of("left::twin"), Ok(left::twin as fn(u64) -> u64 as usize));
    assert!(addr_of("getpid").is_ok(), "a C symbol of libc");
    match addr_of("twin") {
        Err(Error::AmbiguousSymbol { name, candidates }) => {
            assert_eq!(name, "twin");
            assert_eq!(candidates, ["names::left::twin", "names::right::twin"]);
        }
        other => panic!("{other:?}"),
    }
    let e = addr_of("twin").unwrap_err().to_string();
    assert!(e.contains("names::left::twin, names::right::twin"), "{e}");
    assert!(matches!(addr_of("no_such_function_here"), Err(Error::SymbolNotFound { .. })));
}

static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[probekit::kprobe(symbol = "lonely_number_parser")]
fn on_lonely(_regs: &PtRegs) {
    HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

#[test]
fn the_attribute_takes_the_same_names() {
    let _s = SERIAL.lock().unwrap_or_else(|p| p.into_inner());
    let p = on_lonely::register().unwrap();
    assert_eq!(black_box(parsing::lonely_number_parser as fn(u64) -> u64)(1), 41);
    assert_eq!(p.nhit(), 1);
}
