//! Whole-system tests of ketenbus: they start the `ketenbus` binary and talk to it through real sockets.
