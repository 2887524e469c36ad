//! What the background task does after a session ends: retry at once, back off, or stop until
//! the application asks again. A pure decision (the random jitter is a parameter).

use std::time::Duration;

use rand::Rng;
use syncgate_protocol::ErrorCode;

use super::machine::End;
use crate::backoff::Backoff;

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Next {
    /// The client is closing.
    Shutdown,
    /// Stop until the application asks again (after fixing what was wrong).
    Stop { code: Option<u16>, reason: String },
    /// Connect again after `delay`.
    Retry { reason: String, delay: Duration },
}

/// The state carried from one session to the next.
#[derive(Debug, Default)]
pub(crate) struct Reconnect {
    /// Failed attempts in a row (the backoff's exponent).
    pub(crate) attempt: u32,
    /// The last session ended with an expired token and the provider was asked again.
    token_retried: bool,
}

impl Reconnect {
    /// Decides after a session that ended with `end`. `up_for` is how long it was connected
    /// (`None`: it never got a `welcome`); `asked_now`: a `sync_now` arrived while it failed.
    pub(crate) fn after(
        &mut self,
        end: End,
        up_for: Option<Duration>,
        asked_now: bool,
        backoff: &Backoff,
        dead_after: Duration,
        rng: &mut impl Rng,
    ) -> Next {
        // A session that stayed up a while was a success: start the backoff over. (One that
        // failed right after the handshake keeps backing off.)
        if up_for.is_some_and(|d| d >= dead_after) {
            self.attempt = 0;
        }
        let end = match end {
            // The provider was asked again and its token is expired too: it cannot renew.
            End::TokenExpired if self.token_retried => End::Refused {
                code: Some(ErrorCode::TokenExpired.code()),
                reason: "the token has expired and the token provider gave no fresh one".into(),
            },
            other => other,
        };
        match end {
            End::Shutdown => Next::Shutdown,
            End::Refused { code, reason } => {
                self.attempt = 0;
                self.token_retried = false;
                Next::Stop { code, reason }
            }
            End::GoAway {
                reason,
                retry_after,
            } => {
                self.attempt = 0;
                Next::Retry {
                    reason: format!("server going away: {reason}"),
                    delay: Backoff::after_goaway(retry_after, rng),
                }
            }
            End::TokenExpired => {
                self.token_retried = true;
                Next::Retry {
                    reason: "token expired; asking the provider for a new one".into(),
                    delay: Duration::ZERO,
                }
            }
            End::Lost { reason } => {
                self.token_retried = false;
                // A request that arrived while this attempt was failing asks to sync now: it
                // cuts the backoff short, as one arriving during the wait does.
                let delay = if asked_now {
                    Duration::ZERO
                } else {
                    backoff.delay(self.attempt, rng)
                };
                self.attempt = self.attempt.saturating_add(1);
                Next::Retry { reason, delay }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const DEAD: Duration = Duration::from_secs(25);

    fn backoff() -> Backoff {
        Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(10),
        }
    }

    fn lost() -> End {
        End::Lost {
            reason: "connection refused".into(),
        }
    }

    fn delay(n: &Next) -> Duration {
        match n {
            Next::Retry { delay, .. } => *delay,
            other => panic!("not a retry: {other:?}"),
        }
    }

    #[test]
    fn failures_back_off_and_a_session_that_stayed_up_starts_over() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = Reconnect::default();
        for attempt in 0..6 {
            let n = r.after(lost(), None, false, &backoff(), DEAD, &mut rng);
            assert!(delay(&n) <= backoff().window(attempt), "{attempt}: {n:?}");
        }
        assert_eq!(r.attempt, 6);
        // Up for less than dead_after: still backing off.
        r.after(lost(), Some(DEAD / 2), false, &backoff(), DEAD, &mut rng);
        assert_eq!(r.attempt, 7);
        // Up for longer: a success; the next failure is the first again.
        r.after(lost(), Some(DEAD), false, &backoff(), DEAD, &mut rng);
        assert_eq!(r.attempt, 1);
        // A sync_now during the failure retries at once.
        let n = r.after(lost(), None, true, &backoff(), DEAD, &mut rng);
        assert_eq!(delay(&n), Duration::ZERO);
    }

    #[test]
    fn an_expired_token_is_renewed_once_then_the_client_stops() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = Reconnect::default();
        let n = r.after(
            End::TokenExpired,
            Some(DEAD),
            false,
            &backoff(),
            DEAD,
            &mut rng,
        );
        assert_eq!(delay(&n), Duration::ZERO, "ask the provider again at once");
        let n = r.after(End::TokenExpired, None, false, &backoff(), DEAD, &mut rng);
        assert!(
            matches!(
                n,
                Next::Stop {
                    code: Some(202),
                    ..
                }
            ),
            "{n:?}"
        );
        // After the application asks again, one more renewal is allowed.
        let n = r.after(End::TokenExpired, None, false, &backoff(), DEAD, &mut rng);
        assert_eq!(delay(&n), Duration::ZERO);
        // Any other failure in between resets it too.
        r.after(lost(), None, false, &backoff(), DEAD, &mut rng);
        let n = r.after(End::TokenExpired, None, false, &backoff(), DEAD, &mut rng);
        assert_eq!(delay(&n), Duration::ZERO);
    }

    #[test]
    fn goaway_waits_for_the_servers_hint_and_resets_the_backoff() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = Reconnect::default();
        for _ in 0..5 {
            r.after(lost(), None, false, &backoff(), DEAD, &mut rng);
        }
        let hint = Duration::from_secs(2);
        let n = r.after(
            End::GoAway {
                reason: "draining".into(),
                retry_after: hint,
            },
            Some(Duration::from_secs(1)),
            false,
            &backoff(),
            DEAD,
            &mut rng,
        );
        let d = delay(&n);
        assert!(d >= hint && d <= hint + hint / 2, "{d:?}");
        assert_eq!(r.attempt, 0);
    }

    #[test]
    fn refusals_stop_and_shutdown_ends() {
        let mut rng = StdRng::seed_from_u64(7);
        let mut r = Reconnect::default();
        let refused = End::Refused {
            code: Some(200),
            reason: "unauthorized".into(),
        };
        assert_eq!(
            r.after(refused, None, true, &backoff(), DEAD, &mut rng),
            Next::Stop {
                code: Some(200),
                reason: "unauthorized".into()
            }
        );
        assert_eq!(
            r.after(End::Shutdown, None, false, &backoff(), DEAD, &mut rng),
            Next::Shutdown
        );
    }
}
