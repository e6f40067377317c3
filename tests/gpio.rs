//! GPIO triggers against embedded-hal-mock pins: every write the trigger makes is an expected
//! transaction, in order, and `done()` fails the test on a missing or extra one.

use std::io::ErrorKind;
use std::time::{Duration, Instant};

use clipact::gpio::{Mode, Trigger};
use embedded_hal_mock::eh1::digital::{Mock, State, Transaction as T};
use embedded_hal_mock::eh1::MockError;

const PULSE: Mode = Mode::Pulse { duration: Duration::from_millis(100) };

fn ms(t0: Instant, ms: u64) -> Instant {
    t0 + Duration::from_millis(ms)
}

/// Runs `body` on a trigger over a pin that expects `expected` (the initial safe-state write,
/// the body's writes, and the write on drop), then checks nothing else happened.
fn with_trigger(mode: Mode, active_low: bool, expected: &[T], body: impl FnOnce(&mut Trigger<Mock>)) {
    let mut pin = Mock::new(expected);
    // The mock is a handle on shared expectations: the clone checks them after the trigger
    // (and its drop-time write) is gone.
    let mut trigger = Trigger::new(pin.clone(), mode, active_low).unwrap();
    body(&mut trigger);
    drop(trigger);
    pin.done();
}

#[test]
fn level_follows_the_label() {
    let t0 = Instant::now();
    with_trigger(
        Mode::Level,
        false,
        &[
            T::set(State::Low), // new: safe state
            T::set(State::High),
            T::set(State::Low),
            T::set(State::Low), // drop: safe state
        ],
        |t| {
            assert!(!t.is_active());
            t.on_event(true, t0).unwrap();
            assert!(t.is_active());
            // A repeated state writes nothing.
            t.on_event(true, ms(t0, 10)).unwrap();
            t.poll(ms(t0, 10_000)).unwrap();
            assert!(t.is_active(), "level mode has no timeout");
            assert_eq!(t.next_deadline(), None);
            t.on_event(false, ms(t0, 20)).unwrap();
            assert!(!t.is_active());
        },
    );
}

#[test]
fn active_low_inverts_the_level() {
    let t0 = Instant::now();
    with_trigger(
        Mode::Level,
        true,
        &[
            T::set(State::High), // new: inactive is high
            T::set(State::Low),  // active
            T::set(State::High),
            T::set(State::Low),
            T::set(State::High), // drop
        ],
        |t| {
            assert!(t.active_low());
            t.on_event(true, t0).unwrap();
            t.on_event(false, t0).unwrap();
            t.on_event(true, t0).unwrap();
        },
    );
}

#[test]
fn pulse_starts_extends_and_ends_on_poll() {
    let t0 = Instant::now();
    with_trigger(
        PULSE,
        false,
        &[
            T::set(State::Low),  // new
            T::set(State::High), // detection at 0
            T::set(State::Low),  // poll at 150 (extended to 150 by the detection at 50)
            T::set(State::Low),  // drop
        ],
        |t| {
            t.on_event(true, t0).unwrap();
            assert!(t.is_active());
            assert_eq!(t.next_deadline(), Some(ms(t0, 100)));
            // The end of a detection does not cut a pulse short.
            t.on_event(false, ms(t0, 20)).unwrap();
            assert!(t.is_active());
            // A new detection during the pulse extends it without another write.
            t.on_event(true, ms(t0, 50)).unwrap();
            assert_eq!(t.next_deadline(), Some(ms(t0, 150)));
            t.poll(ms(t0, 120)).unwrap();
            assert!(t.is_active(), "the extension holds past the first deadline");
            t.poll(ms(t0, 150)).unwrap();
            assert!(!t.is_active());
            assert_eq!(t.next_deadline(), None);
            // Nothing is due any more.
            t.poll(ms(t0, 1_000)).unwrap();
        },
    );
}

#[test]
fn pulse_active_low_and_a_late_detection_after_expiry() {
    let t0 = Instant::now();
    with_trigger(
        PULSE,
        true,
        &[
            T::set(State::High), // new
            T::set(State::Low),  // detection at 0
            T::set(State::High), // the pulse expired before the next detection: ended first
            T::set(State::Low),  // detection at 500
            T::set(State::High), // drop mid-pulse: safe state
        ],
        |t| {
            t.on_event(true, t0).unwrap();
            // No poll in between: the expired pulse ends, then a new one starts.
            t.on_event(true, ms(t0, 500)).unwrap();
            assert_eq!(t.next_deadline(), Some(ms(t0, 600)));
        },
    );
}

#[test]
fn safe_state_forces_inactive_and_forgets_the_pulse() {
    let t0 = Instant::now();
    with_trigger(
        PULSE,
        false,
        &[
            T::set(State::Low),
            T::set(State::High),
            T::set(State::Low), // safe_state
            T::set(State::Low), // safe_state again: always writes
            T::set(State::Low), // drop
        ],
        |t| {
            t.on_event(true, t0).unwrap();
            t.safe_state().unwrap();
            assert!(!t.is_active());
            assert_eq!(t.next_deadline(), None);
            t.safe_state().unwrap();
            t.poll(ms(t0, 1_000)).unwrap();
        },
    );
}

#[test]
fn drop_drives_the_safe_state() {
    let t0 = Instant::now();
    let mut pin = Mock::new(&[
        T::set(State::High), // new (active low)
        T::set(State::Low),  // active
        T::set(State::High), // drop
    ]);
    {
        let mut trigger = Trigger::new(pin.clone(), Mode::Level, true).unwrap();
        trigger.on_event(true, t0).unwrap();
    }
    pin.done();
}

#[test]
fn pin_errors_are_returned_and_the_write_retried() {
    let t0 = Instant::now();
    let err = || MockError::Io(ErrorKind::Other);
    with_trigger(
        PULSE,
        false,
        &[
            T::set(State::Low),
            T::set(State::High).with_error(err()), // detection fails
            T::set(State::High),                   // the next detection writes again
            T::set(State::Low).with_error(err()),  // ending the pulse fails
            T::set(State::Low),                    // the next poll retries
            T::set(State::Low),                    // drop
        ],
        |t| {
            assert_eq!(t.on_event(true, t0), Err(err()));
            assert!(!t.is_active());
            assert_eq!(t.next_deadline(), None, "no pulse without a write");
            t.on_event(true, ms(t0, 10)).unwrap();
            assert_eq!(t.poll(ms(t0, 110)), Err(err()));
            assert!(t.is_active());
            assert_eq!(t.next_deadline(), Some(ms(t0, 110)), "kept for the retry");
            t.poll(ms(t0, 120)).unwrap();
            assert!(!t.is_active());
        },
    );
}

#[test]
fn new_returns_the_pin_error() {
    let mut pin = Mock::new(&[T::set(State::Low).with_error(MockError::Io(ErrorKind::Other))]);
    let result = Trigger::new(pin.clone(), Mode::Level, false);
    assert_eq!(result.err(), Some(MockError::Io(ErrorKind::Other)));
    // No second write from Drop: the trigger was never built.
    pin.done();
}

#[test]
fn a_failing_drop_does_not_panic() {
    let mut pin = Mock::new(&[T::set(State::Low), T::set(State::Low).with_error(MockError::Io(ErrorKind::Other))]);
    drop(Trigger::new(pin.clone(), Mode::Level, false).unwrap());
    pin.done();
}
