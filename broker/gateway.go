package broker

import (
	"context"
	"slices"
	"time"
)

// gatewayRegistry is a Registry that knows which devices a gateway speaks
// for (provisioning/registry's backends do). Policies with {child}
// templates need it; without it a gateway has no children (fail closed).
type gatewayRegistry interface {
	Children(ctx context.Context, gateway string) ([]string, error)
	GatewaysChangedSince(ctx context.Context, t time.Time) (map[string][]string, error)
}

// loadChildren reads s's children from the registry when the policy has
// {child} templates for it. An unreadable registry refuses the CONNECT.
func (b *Broker) loadChildren(s *session) *refusal {
	if !b.policy.Load().UsesChildren(s.id) {
		return nil
	}
	gr, ok := b.cfg.Registry.(gatewayRegistry)
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	children, err := gr.Children(ctx, s.id.CN)
	if err != nil {
		return &refusal{label: "registry_unavailable", reason: "gateway children unreadable: " + err.Error()}
	}
	s.setChildren(children)
	return nil
}

// pollGateways applies children changes to live and offline sessions of
// those gateways: permissions recompiled, subscriptions no longer allowed
// removed (no reconnect needed).
func (b *Broker) pollGateways(since time.Time) (time.Time, error) {
	gr, ok := b.cfg.Registry.(gatewayRegistry)
	if !ok {
		return since, nil
	}
	now := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	// overlap the window: a change committed just before the last poll
	changed, err := gr.GatewaysChangedSince(ctx, since.Add(-5*time.Second))
	if err != nil {
		return since, err
	}
	for gw, children := range changed {
		for _, s := range b.sessionsOfDevice(gw) {
			if slices.Equal(s.childList(), children) {
				continue
			}
			s.setChildren(children)
			s.compile(b.policy.Load())
			b.prune(s)
			b.audit("gateway children changed", s, "permissions recompiled")
		}
	}
	return now, nil
}
