//! Legacy PC devices: the 16550 serial port, the i8042 reset line and the keel debug port.

pub mod debug_port;
pub mod i8042;
pub mod serial;

pub use debug_port::{DebugPort, DebugPortLog};
pub use i8042::ResetDevice;
pub use serial::{SerialDevice, SerialInputSpace};
