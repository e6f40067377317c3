//! GPIO triggers: a label's detections drive an output line (`DESIGN.md` § Data flow).
//!
//! [`Trigger`] is written in the embedded-hal driver style: it owns any embedded-hal 1.0
//! [`OutputPin`] the board supplies, so the same logic drives a Linux GPIO line, a pin of an
//! I/O expander, or a mock in tests. It is sans-IO with respect to time: the caller passes
//! the current [`Instant`] to [`Trigger::on_event`] and [`Trigger::poll`], so a pulse ends
//! without a timer thread and tests run on fake instants. [`Trigger::next_deadline`] tells
//! the caller when the next [`Trigger::poll`] is due.
//!
//! Which line to drive is a [`LineSelector`]: a chip, by label (`pinctrl-rp1`) or by path
//! (`/dev/gpiochip0`), and a line on it, by name (`GPIO17`) or by offset (`17`). Choose by
//! label and name where the board names its lines: chip numbers move between kernels (the
//! Pi 5's header went from `gpiochip4` to `gpiochip0` with 6.6.45), and Jetson Orin splits its
//! header over two chips. With the `gpio` feature, [`linux::open_output`] requests such a line
//! through the GPIO character device (`gpiocdev`, uAPI v2).
//!
//! # Safe state
//!
//! The safe state is *inactive*. A trigger is driven there when it is created
//! ([`Trigger::new`]), when asked ([`Trigger::safe_state`]) and when it is dropped. A crash
//! skips `Drop`, and the kernel then releases the line, which returns to its default (TRAPS
//! § GPIO): the line keeps no state across a crash-restart under systemd. The safe state
//! after a restart therefore comes from start-up, not from shutdown: [`linux::open_output`]
//! requests the line as an output whose *initial* value is already inactive, so no glitch
//! to active happens between the request and the first [`Trigger::new`] write. Between the
//! crash and the restart the line sits at its hardware default (pull resistors, pinmux): wire
//! the load so that default is harmless (an active-high output with a pull-down, or
//! `active_low` with a pull-up).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::{Duration, Instant};

use embedded_hal::digital::OutputPin;
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// How a trigger turns detections into an output level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The output is active exactly while the label is active (a lamp, a relay that must
    /// follow the detection).
    Level,
    /// Each new detection makes the output active for `duration`; a new detection during a
    /// pulse restarts the time from that detection (a siren, a door opener, an interrupt
    /// line). The end of a detection does not shorten a pulse.
    Pulse {
        /// How long the output stays active after the latest detection.
        duration: Duration,
    },
}

/// Drives one output pin from one label's detections.
///
/// Feed it the label's [`crate::pipeline::Event`]s with [`Trigger::on_event`], and call
/// [`Trigger::poll`] at or after [`Trigger::next_deadline`] so pulses end. Every pin error is
/// returned, never a panic; after an error the trigger's idea of the output is unchanged, so
/// the next call retries the write.
///
/// Dropping a trigger drives its pin inactive ([`Trigger::safe_state`]); an error there can
/// only be logged.
pub struct Trigger<P: OutputPin> {
    pin: P,
    mode: Mode,
    active_low: bool,
    /// Whether the output was last driven active (logically, before `active_low`).
    active: bool,
    /// When the current pulse ends ([`Mode::Pulse`] only).
    pulse_end: Option<Instant>,
}

impl<P: OutputPin> Trigger<P> {
    /// Wraps `pin` and drives it inactive at once: the board hands over a pin in an unknown
    /// state, and the trigger must start from a known one. With `active_low`, active is
    /// electrical low (and inactive high).
    pub fn new(mut pin: P, mode: Mode, active_low: bool) -> Result<Self, P::Error> {
        // Written before `Self` exists: on error the pin is dropped as it is, without a
        // second attempt from `Drop`.
        write(&mut pin, false, active_low)?;
        Ok(Self { pin, mode, active_low, active: false, pulse_end: None })
    }

    /// The trigger's mode.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Whether active is electrical low.
    pub fn active_low(&self) -> bool {
        self.active_low
    }

    /// Whether the output is currently driven active.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// When the current pulse ends, if one is running: call [`Trigger::poll`] then (or
    /// later). `None` in [`Mode::Level`] and between pulses.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pulse_end
    }

    /// The label turned on (`active`, a new detection) or off, at `now`.
    ///
    /// [`Mode::Level`] follows `active`. [`Mode::Pulse`] starts a pulse on a detection, or
    /// extends the running one to `now + duration`, and ignores the end of a detection. An
    /// expired pulse is ended first, as if [`Trigger::poll`] had run.
    pub fn on_event(&mut self, active: bool, now: Instant) -> Result<(), P::Error> {
        match self.mode {
            Mode::Level => self.drive(active),
            Mode::Pulse { duration } => {
                self.poll(now)?;
                if active {
                    // Drive first: if the write fails, no pulse is recorded, and `poll` will
                    // not try to end a pulse that never started.
                    self.drive(true)?;
                    self.pulse_end = Some(now + duration);
                }
                Ok(())
            }
        }
    }

    /// Ends a pulse whose time is up at `now`. Cheap when nothing is due: call it as often as
    /// convenient (every frame, or at [`Trigger::next_deadline`]).
    pub fn poll(&mut self, now: Instant) -> Result<(), P::Error> {
        if let Some(end) = self.pulse_end {
            if now >= end {
                // On error the deadline stays, so the next poll retries the write.
                self.drive(false)?;
                self.pulse_end = None;
            }
        }
        Ok(())
    }

    /// Drives the output inactive and forgets any running pulse. Always writes, even when
    /// the output is believed inactive: this is the call that must hold when something else
    /// touched the line.
    pub fn safe_state(&mut self) -> Result<(), P::Error> {
        self.write(false)?;
        self.active = false;
        self.pulse_end = None;
        Ok(())
    }

    /// Drives the output to `active` unless it is already there (no redundant writes on the
    /// hot path: each is a syscall on Linux).
    fn drive(&mut self, active: bool) -> Result<(), P::Error> {
        if self.active != active {
            self.write(active)?;
            self.active = active;
        }
        Ok(())
    }

    fn write(&mut self, active: bool) -> Result<(), P::Error> {
        write(&mut self.pin, active, self.active_low)
    }
}

/// Drives `pin` to the electrical level of logical `active`.
fn write<P: OutputPin>(pin: &mut P, active: bool, active_low: bool) -> Result<(), P::Error> {
    if active != active_low {
        pin.set_high()
    } else {
        pin.set_low()
    }
}

impl<P: OutputPin> fmt::Debug for Trigger<P> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // `P` need not be `Debug`; the trigger's own state is what matters in logs.
        f.debug_struct("Trigger")
            .field("mode", &self.mode)
            .field("active_low", &self.active_low)
            .field("active", &self.active)
            .field("pulse_end", &self.pulse_end)
            .finish_non_exhaustive()
    }
}

impl<P: OutputPin> Drop for Trigger<P> {
    fn drop(&mut self) {
        // Drop cannot return the error; a line that cannot be written is worth a warning.
        if let Err(e) = self.safe_state() {
            tracing::warn!(error = ?e, "GPIO trigger: cannot drive the safe state on drop");
        }
    }
}

/// The GPIO chip a line is on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ChipSelector {
    /// The chip whose label (as `gpiodetect` shows it) is this, e.g. `pinctrl-rp1`. Stable
    /// across kernels and boots, unlike chip numbers.
    Label(String),
    /// The chip at this character-device path, e.g. `/dev/gpiochip0`.
    Path(PathBuf),
}

impl ChipSelector {
    /// A string starting with `/` is a path, anything else a label. (`gpiochip0` is a label
    /// that no chip has: chip *names* are not labels; write `/dev/gpiochip0` for that chip.)
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Err(SelectorError::EmptyChip);
        }
        Ok(if s.starts_with('/') { Self::Path(PathBuf::from(s)) } else { Self::Label(s.to_owned()) })
    }
}

impl fmt::Display for ChipSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Label(label) => f.write_str(label),
            Self::Path(path) => write!(f, "{}", path.display()),
        }
    }
}

/// A line on a chip.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LineRef {
    /// The line with this name (as `gpioinfo` shows it), e.g. `GPIO17` on a Raspberry Pi.
    Name(String),
    /// The line at this offset on its chip.
    Offset(u32),
}

impl LineRef {
    /// All ASCII digits is an offset, anything else a name.
    pub fn parse(s: &str) -> Result<Self, SelectorError> {
        if s.trim().is_empty() {
            return Err(SelectorError::EmptyLine);
        }
        if s.bytes().all(|b| b.is_ascii_digit()) {
            s.parse().map(Self::Offset).map_err(|_| SelectorError::OffsetRange(s.to_owned()))
        } else {
            Ok(Self::Name(s.to_owned()))
        }
    }
}

impl fmt::Display for LineRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Name(name) => f.write_str(name),
            Self::Offset(offset) => write!(f, "{offset}"),
        }
    }
}

/// In TOML a line is a string (a name) or an integer (an offset): `line = "GPIO17"` or
/// `line = 17`. A string is always a name, even `"17"`, so a line named by digits stays
/// reachable.
impl<'de> Deserialize<'de> for LineRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct LineVisitor;

        impl Visitor<'_> for LineVisitor {
            type Value = LineRef;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a line name (a string) or a line offset (an integer)")
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<LineRef, E> {
                if v.is_empty() {
                    return Err(E::invalid_value(de::Unexpected::Str(v), &self));
                }
                Ok(LineRef::Name(v.to_owned()))
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<LineRef, E> {
                u32::try_from(v).map(LineRef::Offset).map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<LineRef, E> {
                u32::try_from(v).map(LineRef::Offset).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }
        }

        deserializer.deserialize_any(LineVisitor)
    }
}

impl Serialize for LineRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Name(name) => serializer.serialize_str(name),
            Self::Offset(offset) => serializer.serialize_u32(*offset),
        }
    }
}

/// Which output line to drive: a chip and a line on it.
///
/// The compact form `CHIP:LINE` ([`FromStr`]) splits at the *last* colon, because chip
/// labels may contain colons (ACPI chips such as `INTC1056:00`) and line names rarely do:
/// `pinctrl-rp1:GPIO17`, `pinctrl-bcm2711:17`, `/dev/gpiochip0:17`, `INTC1056:00:5`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LineSelector {
    /// The chip.
    pub chip: ChipSelector,
    /// The line on that chip.
    pub line: LineRef,
}

impl LineSelector {
    /// A selector from its two parts.
    pub fn new(chip: ChipSelector, line: LineRef) -> Self {
        Self { chip, line }
    }
}

impl FromStr for LineSelector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, SelectorError> {
        let (chip, line) = s.rsplit_once(':').ok_or_else(|| SelectorError::NoColon(s.to_owned()))?;
        Ok(Self { chip: ChipSelector::parse(chip)?, line: LineRef::parse(line)? })
    }
}

impl fmt::Display for LineSelector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.chip, self.line)
    }
}

/// A [`LineSelector`] that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    /// No `:` between chip and line.
    #[error("GPIO line `{0}` must be CHIP:LINE, e.g. `pinctrl-rp1:GPIO17` or `/dev/gpiochip0:17`")]
    NoColon(String),
    /// Nothing before the colon.
    #[error("GPIO chip is empty: give a chip label (`pinctrl-rp1`) or a path (`/dev/gpiochip0`)")]
    EmptyChip,
    /// Nothing after the colon.
    #[error("GPIO line is empty: give a line name (`GPIO17`) or an offset (`17`)")]
    EmptyLine,
    /// An offset that does not fit a `u32`.
    #[error("GPIO line offset `{0}` is out of range")]
    OffsetRange(String),
}

/// The Linux backend: lines of the GPIO character device, through `gpiocdev` (uAPI v2) and
/// `gpiocdev-embedded-hal`'s [`OutputPin`](gpiocdev_embedded_hal::OutputPin).
#[cfg(feature = "gpio")]
pub mod linux {
    use super::*;

    use gpiocdev::line::Value;
    use gpiocdev::Chip;

    /// The consumer name the kernel shows for our lines (`gpioinfo`), so whoever finds a
    /// line busy sees who holds it.
    pub const CONSUMER: &str = "clipact";

    /// The pin type this backend hands to a [`Trigger`].
    pub type Pin = gpiocdev_embedded_hal::OutputPin;

    /// Why a line could not be opened.
    #[derive(Debug, thiserror::Error)]
    pub enum OpenError {
        /// `/dev` could not be listed.
        #[error("cannot list GPIO chips in /dev: {0}")]
        ListChips(#[source] gpiocdev::Error),
        /// No chip carries the label.
        #[error("no GPIO chip labelled `{label}` (found: {}){}", found_list(found), chip_name_hint(label))]
        NoSuchLabel {
            /// The label asked for.
            label: String,
            /// `path (label)` of every chip that could be read.
            found: Vec<String>,
        },
        /// Several chips carry the label, so it does not say which one.
        #[error("several GPIO chips are labelled `{label}` ({}): select the chip by path", paths.join(", "))]
        AmbiguousLabel {
            /// The label asked for.
            label: String,
            /// Paths of the chips that carry it.
            paths: Vec<String>,
        },
        /// The chip could not be opened or queried.
        #[error("GPIO chip {chip}: {source}")]
        Chip {
            /// The chip path.
            chip: String,
            /// The underlying error.
            #[source]
            source: gpiocdev::Error,
        },
        /// No line on the chip has the name.
        #[error("line `{name}` not found on {chip}{}", suggestion(name, names))]
        NoSuchLine {
            /// The name asked for.
            name: String,
            /// `path (label)` of the chip.
            chip: String,
            /// Names of the chip's lines (for the suggestion).
            names: Vec<String>,
        },
        /// The offset is past the chip's last line.
        #[error("line offset {offset} is out of range on {chip}: it has {num_lines} lines (0..{num_lines})")]
        OffsetRange {
            /// The offset asked for.
            offset: u32,
            /// `path (label)` of the chip.
            chip: String,
            /// The chip's number of lines.
            num_lines: u32,
        },
        /// Another consumer holds the line.
        #[error("line {line} on {chip} is in use by `{consumer}`")]
        Busy {
            /// The line.
            line: String,
            /// `path (label)` of the chip.
            chip: String,
            /// Who holds it (may be empty: the kernel, or an unnamed consumer).
            consumer: String,
        },
        /// The kernel refused the request.
        #[error("cannot request line {line} on {chip} as an output: {source}")]
        Request {
            /// The line.
            line: String,
            /// `path (label)` of the chip.
            chip: String,
            /// The underlying error.
            #[source]
            source: gpiocdev::Error,
        },
        /// `gpiocdev-embedded-hal` refused the request (cannot happen for a one-line output
        /// request; kept rather than unwrapped).
        #[error("line {line} on {chip}: {source}")]
        Pin {
            /// The line.
            line: String,
            /// `path (label)` of the chip.
            chip: String,
            /// The underlying error.
            #[source]
            source: gpiocdev_embedded_hal::Error,
        },
    }

    const UNREADABLE: &str = "unreadable";

    fn found_list(found: &[String]) -> String {
        if found.is_empty() {
            return "no GPIO chips in /dev".into();
        }
        let mut list = found.join(", ");
        if found.iter().any(|f| f.contains(UNREADABLE)) {
            // The usual cause: the service user is not in group `gpio`.
            list.push_str("; is this user in group `gpio`?");
        }
        list
    }

    fn chip_name_hint(label: &str) -> &'static str {
        let is_chip_name =
            label.strip_prefix("gpiochip").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if is_chip_name {
            "; `gpiochipN` is a chip name, not a label: write its path (`/dev/gpiochipN`) or, \
             better, its label, which does not change between kernels"
        } else {
            ""
        }
    }

    fn suggestion(name: &str, names: &[String]) -> String {
        match crate::config::closest(name, names.iter().map(String::as_str)) {
            Some(best) => format!("; did you mean `{best}`?"),
            None if names.is_empty() => "; its lines have no names (give an offset)".into(),
            None => {
                let shown: Vec<&str> = names.iter().filter(|n| !n.is_empty()).take(16).map(String::as_str).collect();
                let more = if names.len() > shown.len() { ", …" } else { "" };
                format!("; its lines: {}{more}", shown.join(", "))
            }
        }
    }

    fn describe(chip: &Chip, label: &str) -> String {
        format!("{} (`{label}`)", chip.path().display())
    }

    /// Opens the chip `selector` names; returns it with its label.
    pub fn find_chip(selector: &ChipSelector) -> Result<(Chip, String), OpenError> {
        match selector {
            ChipSelector::Path(path) => {
                let chip_error = |source| OpenError::Chip { chip: path.display().to_string(), source };
                let chip = Chip::from_path(path).map_err(chip_error)?;
                let label = chip.info().map_err(chip_error)?.label;
                Ok((chip, label))
            }
            ChipSelector::Label(wanted) => {
                let mut found = Vec::new();
                let mut matches = Vec::new();
                for path in gpiocdev::chip::chips().map_err(OpenError::ListChips)? {
                    // A chip we may not open is listed, not fatal: another chip may still
                    // match, and if none does the list shows why.
                    let info = Chip::from_path(&path).and_then(|chip| Ok((chip.info()?, chip)));
                    let (info, chip) = match info {
                        Ok(found) => found,
                        Err(e) => {
                            found.push(format!("{} ({UNREADABLE}: {e})", path.display()));
                            continue;
                        }
                    };
                    found.push(format!("{} `{}`", path.display(), info.label));
                    if info.label == *wanted {
                        matches.push((chip, info.label));
                    }
                }
                match matches.len() {
                    0 => Err(OpenError::NoSuchLabel { label: wanted.clone(), found }),
                    1 => Ok(matches.pop().expect("one match")),
                    _ => Err(OpenError::AmbiguousLabel {
                        label: wanted.clone(),
                        paths: matches.iter().map(|(chip, _)| chip.path().display().to_string()).collect(),
                    }),
                }
            }
        }
    }

    /// Requests the selected line as an output, driven *inactive* from the moment of the
    /// request (electrical high when `active_low`, else low), and wraps it in a [`Trigger`].
    ///
    /// The initial value is what makes a restart safe: after a crash the kernel released the
    /// line, and requesting it with any other value would pulse the load (see the module
    /// docs).
    pub fn open_trigger(selector: &LineSelector, mode: Mode, active_low: bool) -> Result<Trigger<Pin>, OpenError> {
        let pin = open_output(selector, active_low)?;
        let (line, chip) = (selector.line.to_string(), selector.chip.to_string());
        Trigger::new(pin, mode, active_low).map_err(|source| OpenError::Pin { line, chip, source })
    }

    /// Requests the selected line as an output whose initial value is inactive (electrical
    /// high when `active_low`, else low). Polarity stays in [`Trigger`], not in the kernel's
    /// line config, so every [`OutputPin`] behaves alike.
    pub fn open_output(selector: &LineSelector, active_low: bool) -> Result<Pin, OpenError> {
        let (chip, label) = find_chip(&selector.chip)?;
        let chip_desc = describe(&chip, &label);
        let chip_error = |source| OpenError::Chip { chip: chip_desc.clone(), source };
        let info = match &selector.line {
            LineRef::Offset(offset) => {
                let num_lines = chip.info().map_err(chip_error)?.num_lines;
                if *offset >= num_lines {
                    return Err(OpenError::OffsetRange { offset: *offset, chip: chip_desc, num_lines });
                }
                chip.line_info(*offset).map_err(chip_error)?
            }
            LineRef::Name(name) => {
                let mut names = Vec::new();
                let mut hit = None;
                for info in chip.line_info_iter().map_err(chip_error)? {
                    let info = info.map_err(chip_error)?;
                    if info.name == *name {
                        hit = Some(info);
                        break;
                    }
                    names.push(info.name);
                }
                hit.ok_or_else(|| OpenError::NoSuchLine { name: name.clone(), chip: chip_desc.clone(), names })?
            }
        };
        let line = if info.name.is_empty() {
            info.offset.to_string()
        } else {
            format!("`{}` (offset {})", info.name, info.offset)
        };
        // Checked up front for the message: the kernel would only say EBUSY.
        if info.used {
            return Err(OpenError::Busy { line, chip: chip_desc, consumer: info.consumer });
        }
        // Electrical level, since the request sets no active-low flag: Active = high.
        let inactive = if active_low { Value::Active } else { Value::Inactive };
        let request = gpiocdev::Request::builder()
            .on_chip(chip.path())
            .with_consumer(CONSUMER)
            .with_line(info.offset)
            .as_output(inactive)
            .request()
            .map_err(|source| OpenError::Request { line: line.clone(), chip: chip_desc.clone(), source })?;
        Pin::try_from(request).map_err(|source| OpenError::Pin { line, chip: chip_desc, source })
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn no_label_message_lists_chips_and_hints() {
            let e = OpenError::NoSuchLabel {
                label: "pinctrl-rp1".into(),
                found: vec!["/dev/gpiochip0 `pinctrl-bcm2711`".into()],
            };
            assert_eq!(e.to_string(), "no GPIO chip labelled `pinctrl-rp1` (found: /dev/gpiochip0 `pinctrl-bcm2711`)");
            let e = OpenError::NoSuchLabel {
                label: "gpiochip4".into(),
                found: vec![format!("/dev/gpiochip0 ({UNREADABLE}: Permission denied)")],
            };
            let msg = e.to_string();
            assert!(msg.contains("in group `gpio`"), "{msg}");
            assert!(msg.contains("/dev/gpiochipN"), "{msg}");
            let e = OpenError::NoSuchLabel { label: "pinctrl-rp1".into(), found: vec![] };
            assert_eq!(e.to_string(), "no GPIO chip labelled `pinctrl-rp1` (found: no GPIO chips in /dev)");
        }

        #[test]
        fn no_line_message_suggests() {
            let e = OpenError::NoSuchLine {
                name: "GPIO71".into(),
                chip: "/dev/gpiochip0 (`pinctrl-rp1`)".into(),
                names: vec!["GPIO16".into(), "GPIO17".into(), "ID_SD".into()],
            };
            assert_eq!(
                e.to_string(),
                "line `GPIO71` not found on /dev/gpiochip0 (`pinctrl-rp1`); did you mean `GPIO17`?"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selector_label_and_name() {
        let s: LineSelector = "pinctrl-rp1:GPIO17".parse().unwrap();
        assert_eq!(s.chip, ChipSelector::Label("pinctrl-rp1".into()));
        assert_eq!(s.line, LineRef::Name("GPIO17".into()));
        assert_eq!(s.to_string(), "pinctrl-rp1:GPIO17");
    }

    #[test]
    fn selector_label_and_offset() {
        let s: LineSelector = "pinctrl-bcm2711:17".parse().unwrap();
        assert_eq!(s.chip, ChipSelector::Label("pinctrl-bcm2711".into()));
        assert_eq!(s.line, LineRef::Offset(17));
    }

    #[test]
    fn selector_path_and_offset() {
        let s: LineSelector = "/dev/gpiochip0:5".parse().unwrap();
        assert_eq!(s.chip, ChipSelector::Path("/dev/gpiochip0".into()));
        assert_eq!(s.line, LineRef::Offset(5));
        assert_eq!(s.to_string(), "/dev/gpiochip0:5");
    }

    #[test]
    fn selector_splits_at_last_colon() {
        // ACPI chip labels carry a colon.
        let s: LineSelector = "INTC1056:00:5".parse().unwrap();
        assert_eq!(s.chip, ChipSelector::Label("INTC1056:00".into()));
        assert_eq!(s.line, LineRef::Offset(5));
        // Jetson line names carry dots.
        let s: LineSelector = "tegra234-gpio:PQ.05".parse().unwrap();
        assert_eq!(s.line, LineRef::Name("PQ.05".into()));
    }

    #[test]
    fn selector_errors() {
        assert_eq!("GPIO17".parse::<LineSelector>(), Err(SelectorError::NoColon("GPIO17".into())));
        assert_eq!(":GPIO17".parse::<LineSelector>(), Err(SelectorError::EmptyChip));
        assert_eq!("pinctrl-rp1:".parse::<LineSelector>(), Err(SelectorError::EmptyLine));
        assert_eq!(
            "pinctrl-rp1:99999999999".parse::<LineSelector>(),
            Err(SelectorError::OffsetRange("99999999999".into()))
        );
    }

    #[test]
    fn line_ref_from_toml() {
        #[derive(Deserialize)]
        struct T {
            line: LineRef,
        }
        let t: T = toml::from_str("line = 17").unwrap();
        assert_eq!(t.line, LineRef::Offset(17));
        let t: T = toml::from_str("line = \"17\"").unwrap();
        assert_eq!(t.line, LineRef::Name("17".into()));
        let e = toml::from_str::<T>("line = -1").err().unwrap().to_string();
        assert!(e.contains("line offset"), "{e}");
        let e = toml::from_str::<T>("line = true").err().unwrap().to_string();
        assert!(e.contains("a line name (a string) or a line offset"), "{e}");
    }
}
