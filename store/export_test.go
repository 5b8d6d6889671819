package store

import "context"

// TranslateForTest exposes translate to the external tests.
var TranslateForTest = translate

// SettingInTxForTest reads a setting inside a transaction begun as InTx
// begins its own.
func (s *Store) SettingInTxForTest(ctx context.Context, name string) (string, error) {
	var v string
	err := s.InTx(ctx, func(t *Tx) error {
		return translate(t.tx.QueryRow(ctx, `SELECT current_setting($1)`, name).Scan(&v))
	})
	return v, err
}
