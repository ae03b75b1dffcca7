//! Compiles `native/allocator.c` (mimalloc defaults set before `main`) and links it into the
//! `ketenbus` binary only: tests and other binaries keep the system allocator's behaviour.

fn main() {
    println!("cargo:rerun-if-changed=native/allocator.c");
    let include = std::env::var("DEP_MIMALLOC_INCLUDE_DIR")
        .expect("libmimalloc-sys names its include directory");
    let objects = cc::Build::new()
        .file("native/allocator.c")
        .include(include)
        .warnings(true)
        .compile_intermediates();
    // An object file on the link line is linked whole (an archive member only holding a
    // constructor would be left out).
    for o in objects {
        println!("cargo:rustc-link-arg-bin=ketenbus={}", o.display());
    }
}
