package device

import (
	"context"
	"fmt"
	"math/rand/v2"
	"time"
)

// renewAt picks the renewal time of a certificate: RenewAt of its lifetime
// after NotBefore, jittered by ±RenewJitter of the lifetime so a fleet
// enrolled together does not renew together.
func (c *Client) renewAt() time.Time {
	leaf := c.id.Load().Leaf()
	life := leaf.NotAfter.Sub(leaf.NotBefore)
	jitter := (rand.Float64()*2 - 1) * c.cfg.RenewJitter * float64(life)
	return leaf.NotBefore.Add(time.Duration(c.cfg.RenewAt*float64(life) + jitter))
}

// renewLoop renews the certificate before it expires and reconnects with
// the new one (the session is kept: clean session is off by default).
// Failures are retried with backoff until the certificate expires.
func (c *Client) renewLoop() {
	defer c.wg.Done()
	if c.cfg.DisableRenewal || c.cfg.Store == nil || c.id.Load().Config.EST == "" {
		return
	}
	retry := time.Duration(0)
	for {
		at := c.renewAt()
		if retry > 0 {
			at = time.Now().Add(retry)
		}
		timer := time.NewTimer(time.Until(at))
		select {
		case <-c.closed:
			timer.Stop()
			return
		case <-timer.C:
		}
		id := c.id.Load()
		if time.Now().After(id.Leaf().NotAfter) {
			c.log.Error("certificate expired before renewal succeeded: enroll again", "not_after", id.Leaf().NotAfter)
			c.fail(StateExpired, fmt.Errorf("%w at %s before renewal succeeded: enroll again", ErrExpired, id.Leaf().NotAfter.UTC().Format(time.RFC3339)))
			c.paho.Disconnect(0)
			return
		}
		ctx, cancel := context.WithTimeout(c.ctx, time.Minute) // Close ends it
		renewed, err := Renew(ctx, id, c.cfg.Store, RenewConfig{})
		cancel()
		if c.ctx.Err() != nil {
			return
		}
		if err != nil {
			life := id.Leaf().NotAfter.Sub(id.Leaf().NotBefore)
			retry = min(max(retry*2, life/60, time.Second), time.Until(id.Leaf().NotAfter)/4+time.Second)
			c.log.Warn("renewal failed; retrying", "err", err, "retry_in", retry)
			continue
		}
		retry = 0
		if err := c.setIdentity(renewed); err != nil {
			c.log.Error("renewed identity unusable", "err", err)
			continue
		}
		c.log.Info("certificate renewed", "serial", renewed.Leaf().SerialNumber.Text(16), "not_after", renewed.Leaf().NotAfter)
		if c.cfg.OnRenewed != nil {
			c.cfg.OnRenewed(renewed.Leaf())
		}
		// The live connection still carries the old certificate, which the
		// broker would cut at its expiry: reconnect now with the new one.
		select {
		case c.wake <- struct{}{}:
		default:
		}
	}
}
