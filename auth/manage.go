package auth

import (
	"context"
	"errors"
	"fmt"

	"github.com/google/uuid"

	"github.com/tallyledger/tally/store"
)

// Created is a key just made: Key.String() is shown once and never again.
type Created struct {
	Key        Key
	ClientID   uuid.UUID
	ClientName string
	Name       string
	Role       Role
	NewClient  bool
}

// CreateKey makes a key named name. With clientName == "" it creates a new
// client called name with the given role; otherwise it adds a key to the
// existing client clientName, whose role the key must have (role "" takes
// the client's).
func CreateKey(ctx context.Context, st *store.Store, name string, role Role, clientName string) (Created, error) {
	if name == "" {
		return Created{}, errors.New("a key needs a --name")
	}
	var cl store.Client
	newClient := false
	if clientName == "" {
		if role == "" {
			return Created{}, errors.New("a new client needs a --role")
		}
		id, err := uuid.NewV7()
		if err != nil {
			return Created{}, err
		}
		cl, err = st.CreateClient(ctx, store.Client{ID: id, Name: name, Role: string(role)})
		if errors.Is(err, store.ErrConflict) {
			return Created{}, fmt.Errorf("a client named %q exists already: pass --client %q to add a key to it", name, name)
		}
		if err != nil {
			return Created{}, err
		}
		newClient = true
	} else {
		var err error
		cl, err = st.GetClientByName(ctx, clientName)
		if errors.Is(err, store.ErrNotFound) {
			return Created{}, fmt.Errorf("no client named %q", clientName)
		}
		if err != nil {
			return Created{}, err
		}
		if role == "" {
			role = Role(cl.Role)
		}
		if string(role) != cl.Role {
			return Created{}, fmt.Errorf("client %q has role %s; its keys have that role too", clientName, cl.Role)
		}
	}
	k, err := NewKey()
	if err != nil {
		return Created{}, err
	}
	if err := st.CreateAPIKey(ctx, store.APIKey{ID: k.ID, ClientID: cl.ID, Name: name, Role: string(role), SecretHash: HashSecret(k.Secret)}); err != nil {
		return Created{}, err
	}
	return Created{Key: k, ClientID: cl.ID, ClientName: cl.Name, Name: name, Role: role, NewClient: newClient}, nil
}
